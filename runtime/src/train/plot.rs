//! Loss curves as a PNG, by hand: a small raster canvas, a 5×7 bitmap font, Bresenham lines, and a
//! PNG encoder whose zlib stream uses stored (uncompressed) deflate blocks.
//!
//! Stored blocks keep the encoder a few lines long; the image is written with a palette (a plot has
//! a handful of colors), one byte per pixel, so an 800×500 chart is about 400 kB.

use crate::error::Result;
use std::path::Path;

/// One line of the chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text (empty: no legend entry).
    pub name: String,
    /// (x, y) points in drawing order; points with a NaN or infinite coordinate are skipped and
    /// break the line.
    pub points: Vec<(f64, f64)>,
    /// Line color, RGB.
    pub color: [u8; 3],
    /// Drawn dashed (a second curve of the same color, e.g. a run's validation loss).
    pub dashed: bool,
}

/// Line colors for successive series (matplotlib's first eight "tab10" colors).
pub const COLORS: [[u8; 3]; 8] = [
    [0x1f, 0x77, 0xb4],
    [0xff, 0x7f, 0x0e],
    [0x2c, 0xa0, 0x2c],
    [0xd6, 0x27, 0x28],
    [0x94, 0x67, 0xbd],
    [0x8c, 0x56, 0x4b],
    [0xe3, 0x77, 0xc2],
    [0x7f, 0x7f, 0x7f],
];

impl Series {
    /// A series colored by its position `index` in the chart.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>, index: usize) -> Self {
        Series { name: name.into(), points, color: COLORS[index % COLORS.len()], dashed: false }
    }

    /// The same series drawn dashed.
    pub fn dashed(self) -> Self {
        Series { dashed: true, ..self }
    }
}

/// Dash pattern of dashed lines: this many steps along the line drawn, then as many skipped.
const DASH: u32 = 7;

/// Size of every chart, in pixels.
pub const WIDTH: usize = 800;
pub const HEIGHT: usize = 500;
const WHITE: [u8; 3] = [255, 255, 255];
const BLACK: [u8; 3] = [0, 0, 0];
const TEXT: [u8; 3] = [40, 40, 40];
const GRID: [u8; 3] = [228, 228, 228];
const FRAME: [u8; 3] = [90, 90, 90];

/// Plots `series` against "step" and "loss" into a PNG at `path` (written to a temporary name and
/// renamed, so a viewer never sees half a file).
pub fn plot_losses(path: &Path, title: &str, series: &[Series]) -> Result<()> {
    plot_lines(path, title, "step", "loss", series)
}

/// Plots `series` as lines on linear axes labelled `x_label` and `y_label` into a PNG at `path`.
pub fn plot_lines(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<()> {
    crate::util::write_atomic(path, &encode_png(&render(title, x_label, y_label, series)))
}

// ---------------------------------------------------------------------------------------------
// Canvas and drawing.

struct Canvas {
    w: usize,
    h: usize,
    /// px: (h, w) RGB, row-major.
    px: Vec<[u8; 3]>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Canvas { w, h, px: vec![WHITE; w * h] }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            self.px[y as usize * self.w + x as usize] = c;
        }
    }

    #[cfg(test)]
    fn get(&self, x: usize, y: usize) -> [u8; 3] {
        self.px[y * self.w + x]
    }

    fn fill(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        for y in y0..=y1 {
            for x in x0..=x1 {
                self.set(x, y, c);
            }
        }
    }

    fn hline(&mut self, x0: i64, x1: i64, y: i64, c: [u8; 3]) {
        self.fill(x0, y, x1, y, c);
    }

    fn vline(&mut self, x: i64, y0: i64, y1: i64, c: [u8; 3]) {
        self.fill(x, y0, x, y1, c);
    }

    /// A 2-pixel-wide Bresenham line, clipped to `clip` (x0, y0, x1, y1 inclusive). With `dash`, the
    /// line is dashed and the counter carries the pattern's phase from one segment to the next.
    fn line(
        &mut self,
        (mut x0, mut y0): (i64, i64),
        (x1, y1): (i64, i64),
        c: [u8; 3],
        clip: Rect,
        mut dash: Option<&mut u32>,
    ) {
        let dx = (x1 - x0).abs();
        let dy = -(y1 - y0).abs();
        let sx = if x0 < x1 { 1 } else { -1 };
        let sy = if y0 < y1 { 1 } else { -1 };
        let mut err = dx + dy;
        loop {
            let on = match dash.as_deref_mut() {
                Some(n) => {
                    *n = n.wrapping_add(1);
                    (*n / DASH).is_multiple_of(2)
                }
                None => true,
            };
            for (ox, oy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                let (x, y) = (x0 + ox, y0 + oy);
                if on && clip.contains(x, y) {
                    self.set(x, y, c);
                }
            }
            if x0 == x1 && y0 == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x0 += sx;
            }
            if e2 <= dx {
                err += dx;
                y0 += sy;
            }
        }
    }

    /// Draws `s` with its top-left corner at (x, y), each font pixel a `scale`×`scale` square.
    fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: [u8; 3]) {
        let mut cx = x;
        for ch in s.chars() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        let (px, py) = (cx + col * scale, y + r as i64 * scale);
                        self.fill(px, py, px + scale - 1, py + scale - 1, c);
                    }
                }
            }
            cx += 6 * scale;
        }
    }
}

/// Width in pixels of `s` drawn at `scale` (no trailing gap).
fn text_width(s: &str, scale: i64) -> i64 {
    let n = s.chars().count() as i64;
    if n == 0 { 0 } else { n * 6 * scale - scale }
}

#[derive(Debug, Clone, Copy)]
struct Rect {
    x0: i64,
    y0: i64,
    x1: i64,
    y1: i64,
}

impl Rect {
    fn contains(&self, x: i64, y: i64) -> bool {
        x >= self.x0 && x <= self.x1 && y >= self.y0 && y <= self.y1
    }
}

// ---------------------------------------------------------------------------------------------
// Axes.

/// Tick positions of a linear axis: a "nice" step (1, 2, 2.5 or 5 × 10ⁿ) giving about `target`
/// intervals, and the axis range widened outwards to whole steps.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Axis {
    lo: f64,
    hi: f64,
    step: f64,
}

impl Axis {
    fn new(lo: f64, hi: f64, target: usize) -> Self {
        let (lo, hi) = if lo.is_finite() && hi.is_finite() && lo <= hi { (lo, hi) } else { (0.0, 1.0) };
        let (lo, hi) = if hi - lo > f64::EPSILON * lo.abs().max(hi.abs()).max(1e-300) {
            (lo, hi)
        } else {
            // One distinct value: open a window around it.
            let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
            (lo - pad, hi + pad)
        };
        let raw = (hi - lo) / target.max(1) as f64;
        let mag = 10f64.powf(raw.log10().floor());
        // The tolerance absorbs float noise such as 0.2 / 0.1 = 2.0000000000000004.
        let norm = raw / mag - 1e-9;
        let nice = if norm <= 1.0 {
            1.0
        } else if norm <= 2.0 {
            2.0
        } else if norm <= 2.5 {
            2.5
        } else if norm <= 5.0 {
            5.0
        } else {
            10.0
        };
        let step = nice * mag;
        if !(step.is_finite() && step > 0.0) {
            return Axis { lo, hi, step: hi - lo };
        }
        Axis { lo: (lo / step + 1e-9).floor() * step, hi: (hi / step - 1e-9).ceil() * step, step }
    }

    fn ticks(&self) -> Vec<f64> {
        let n = ((self.hi - self.lo) / self.step).round();
        if !(n.is_finite() && (0.0..=100.0).contains(&n)) {
            return vec![self.lo, self.hi];
        }
        (0..=n as i64)
            .map(|i| {
                let v = self.lo + i as f64 * self.step;
                // Snap float noise (-0.0, 0.30000000000000004) so labels read cleanly.
                if v.abs() < self.step * 1e-9 { 0.0 } else { v }
            })
            .collect()
    }

    /// The labels of `ticks()`, all with the same number of decimals.
    fn labels(&self) -> Vec<String> {
        let ticks = self.ticks();
        let biggest = ticks.iter().fold(0f64, |m, v| m.max(v.abs()));
        if biggest >= 1e6 || (self.step < 1e-4 && biggest > 0.0) {
            return ticks.iter().map(|v| format_exp(*v)).collect();
        }
        let decimals = (0..=8)
            .find(|&d| {
                let s = self.step * 10f64.powi(d);
                (s - s.round()).abs() < 1e-6 * s.max(1.0)
            })
            .unwrap_or(8) as usize;
        ticks.iter().map(|v| format!("{v:.decimals$}")).collect()
    }
}

/// `1.5e-5`, `2e6`: Rust's `{:e}` with at most two decimals, trailing zeros dropped.
fn format_exp(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let s = format!("{v:.2e}");
    match s.split_once('e') {
        Some((m, e)) => {
            let m = if m.contains('.') { m.trim_end_matches('0').trim_end_matches('.') } else { m };
            format!("{m}e{e}")
        }
        None => s,
    }
}

/// Where everything goes: the plot area in pixels and the axes.
struct Layout {
    area: Rect,
    x: Axis,
    y: Axis,
}

impl Layout {
    fn new(series: &[Series]) -> Self {
        let finite = series.iter().flat_map(|s| s.points.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
        for &(x, y) in finite {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        // A little air above and below the curves before rounding out to ticks.
        let pad = (y1 - y0) * 0.02;
        let (y0, y1) = if pad.is_finite() { (y0 - pad, y1 + pad) } else { (y0, y1) };
        let y = Axis::new(y0, y1, 6);
        let x = Axis::new(x0, x1, 8);
        // Leave room on the left for the widest y label.
        let label_w = y.labels().iter().map(|l| text_width(l, 2)).max().unwrap_or(0);
        let left = (label_w + 24).max(60);
        Layout { area: Rect { x0: left, y0: 72, x1: WIDTH as i64 - 30, y1: HEIGHT as i64 - 60 }, x, y }
    }

    /// Pixel of a data point (may lie outside the area; callers clip).
    fn map(&self, (x, y): (f64, f64)) -> (i64, i64) {
        let a = self.area;
        let fx = (x - self.x.lo) / (self.x.hi - self.x.lo);
        let fy = (y - self.y.lo) / (self.y.hi - self.y.lo);
        let px = a.x0 as f64 + fx * (a.x1 - a.x0) as f64;
        let py = a.y1 as f64 - fy * (a.y1 - a.y0) as f64;
        // Bounded, so a wild value cannot make Bresenham walk for ever (NaN becomes 0).
        let clamp = |v: f64| v.round().clamp(-4.0 * WIDTH as f64, 4.0 * WIDTH as f64) as i64;
        (clamp(px), clamp(py))
    }
}

fn render(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Canvas {
    let mut c = Canvas::new(WIDTH, HEIGHT);
    let l = Layout::new(series);
    let a = l.area;

    // Grid and tick labels.
    for (v, label) in l.x.ticks().into_iter().zip(l.x.labels()) {
        let (px, _) = l.map((v, l.y.lo));
        c.vline(px, a.y0, a.y1, GRID);
        c.vline(px, a.y1, a.y1 + 5, FRAME);
        c.text(px - text_width(&label, 2) / 2, a.y1 + 10, &label, 2, TEXT);
    }
    for (v, label) in l.y.ticks().into_iter().zip(l.y.labels()) {
        let (_, py) = l.map((l.x.lo, v));
        c.hline(a.x0, a.x1, py, GRID);
        c.hline(a.x0 - 5, a.x0, py, FRAME);
        c.text(a.x0 - 10 - text_width(&label, 2), py - 7, &label, 2, TEXT);
    }

    // Curves, clipped to the inside of the frame.
    let inner = Rect { x0: a.x0 + 1, y0: a.y0 + 1, x1: a.x1 - 1, y1: a.y1 - 1 };
    for s in series {
        let mut phase = 0u32;
        let ok = |p: &(f64, f64)| p.0.is_finite() && p.1.is_finite();
        for (i, p) in s.points.iter().enumerate() {
            if !ok(p) {
                continue;
            }
            let here = l.map(*p);
            match s.points.get(i + 1).filter(|q| ok(q)) {
                Some(q) => c.line(here, l.map(*q), s.color, inner, s.dashed.then_some(&mut phase)),
                None => {
                    // A point with no finite successor and no finite predecessor would be
                    // invisible: mark it.
                    let alone = i == 0 || !ok(&s.points[i - 1]);
                    if alone {
                        for dy in -2..=2 {
                            for dx in -2..=2 {
                                if inner.contains(here.0 + dx, here.1 + dy) {
                                    c.set(here.0 + dx, here.1 + dy, s.color);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    // Frame, labels, title.
    c.hline(a.x0, a.x1, a.y0, FRAME);
    c.hline(a.x0, a.x1, a.y1, FRAME);
    c.vline(a.x0, a.y0, a.y1, FRAME);
    c.vline(a.x1, a.y0, a.y1, FRAME);
    c.text((a.x0 + a.x1) / 2 - text_width(x_label, 2) / 2, HEIGHT as i64 - 24, x_label, 2, TEXT);
    c.text(a.x0 - text_width(y_label, 2) / 2, a.y0 - 30, y_label, 2, TEXT);
    c.text(WIDTH as i64 / 2 - text_width(title, 3) / 2, 10, title, 3, BLACK);

    // Legend, top right inside the frame; a series with an empty name has no entry.
    let named: Vec<&Series> = series.iter().filter(|s| !s.name.is_empty()).collect();
    if !named.is_empty() {
        let row = 22;
        let w = named.iter().map(|s| text_width(&s.name, 2)).max().unwrap_or(0) + 50;
        let h = row * named.len() as i64 + 10;
        let (lx1, ly0) = (a.x1 - 10, a.y0 + 10);
        let lx0 = lx1 - w;
        c.fill(lx0, ly0, lx1, ly0 + h, WHITE);
        c.hline(lx0, lx1, ly0, GRID);
        c.hline(lx0, lx1, ly0 + h, GRID);
        c.vline(lx0, ly0, ly0 + h, GRID);
        c.vline(lx1, ly0, ly0 + h, GRID);
        for (i, s) in named.iter().enumerate() {
            let y = ly0 + 8 + row * i as i64;
            if s.dashed {
                for x0 in [lx0 + 8, lx0 + 22] {
                    c.fill(x0, y + 6, x0 + 6, y + 8, s.color);
                }
            } else {
                c.fill(lx0 + 8, y + 6, lx0 + 32, y + 8, s.color);
            }
            c.text(lx0 + 40, y, &s.name, 2, TEXT);
        }
    }
    c
}

// ---------------------------------------------------------------------------------------------
// Font: 5×7 glyphs, one byte per row, bit 4 the leftmost column.

const FONT: &[(char, [u8; 7])] = &[
    ('0', [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E]),
    ('1', [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E]),
    ('2', [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F]),
    ('3', [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E]),
    ('4', [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02]),
    ('5', [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E]),
    ('6', [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E]),
    ('7', [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08]),
    ('8', [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E]),
    ('9', [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C]),
    ('A', [0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11]),
    ('B', [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E]),
    ('C', [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E]),
    ('D', [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C]),
    ('E', [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F]),
    ('F', [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10]),
    ('G', [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F]),
    ('H', [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11]),
    ('I', [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E]),
    ('J', [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C]),
    ('K', [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11]),
    ('L', [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F]),
    ('M', [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11]),
    ('N', [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11]),
    ('O', [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E]),
    ('P', [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10]),
    ('Q', [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D]),
    ('R', [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11]),
    ('S', [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E]),
    ('T', [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04]),
    ('U', [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E]),
    ('V', [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04]),
    ('W', [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A]),
    ('X', [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11]),
    ('Y', [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04]),
    ('Z', [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F]),
    ('a', [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F]),
    ('b', [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E]),
    ('c', [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E]),
    ('d', [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F]),
    ('e', [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E]),
    ('f', [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08]),
    ('g', [0x00, 0x00, 0x0F, 0x11, 0x0F, 0x01, 0x0E]),
    ('h', [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11]),
    ('i', [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E]),
    ('j', [0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0C]),
    ('k', [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12]),
    ('l', [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E]),
    ('m', [0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11]),
    ('n', [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11]),
    ('o', [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E]),
    ('p', [0x00, 0x00, 0x1E, 0x11, 0x1E, 0x10, 0x10]),
    ('q', [0x00, 0x00, 0x0D, 0x13, 0x0F, 0x01, 0x01]),
    ('r', [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10]),
    ('s', [0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E]),
    ('t', [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06]),
    ('u', [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D]),
    ('v', [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04]),
    ('w', [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A]),
    ('x', [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11]),
    ('y', [0x00, 0x00, 0x11, 0x11, 0x0F, 0x01, 0x0E]),
    ('z', [0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F]),
    ('.', [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C]),
    (',', [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08]),
    ('-', [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00]),
    ('+', [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00]),
    ('_', [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F]),
    ('=', [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00]),
    (':', [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00]),
    ('/', [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00]),
    ('(', [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02]),
    (')', [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08]),
    ('%', [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03]),
    (' ', [0x00; 7]),
];

/// The glyph of `ch`; `?` for characters the font lacks.
fn glyph(ch: char) -> [u8; 7] {
    const UNKNOWN: [u8; 7] = [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04];
    FONT.iter().find(|(c, _)| *c == ch).map_or(UNKNOWN, |(_, g)| *g)
}

// ---------------------------------------------------------------------------------------------
// PNG.

/// CRC-32 (IEEE, reflected polynomial 0xEDB88320), as PNG chunks use it.
const CRC32_TABLE: [u32; 256] = crate::util::crc32_table(0xEDB8_8320);

/// CRC-32 (IEEE) of the concatenation of `parts`.
fn crc32(parts: &[&[u8]]) -> u32 {
    crate::util::crc32_with(&CRC32_TABLE, parts)
}

/// Adler-32, the zlib stream's checksum of the uncompressed data.
fn adler32(data: &[u8]) -> u32 {
    const MOD: u32 = 65521;
    let (mut a, mut b) = (1u32, 0u32);
    // 5552 bytes is the longest run whose sums cannot overflow u32 before the modulo (zlib's NMAX).
    for chunk in data.chunks(5552) {
        for &x in chunk {
            a += u32::from(x);
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
}

/// A zlib stream of `data` in stored deflate blocks.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    // CMF 0x78: deflate with a 32 KiB window; FLG 0x01 makes (CMF·256 + FLG) a multiple of 31.
    let mut out = vec![0x78, 0x01];
    let mut blocks = data.chunks(65535).peekable();
    if blocks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xFF, 0xFF]);
    }
    while let Some(block) = blocks.next() {
        // BFINAL in bit 0, BTYPE 00 (stored); the rest of the byte is padding to the boundary.
        out.push(u8::from(blocks.peek().is_none()));
        let len = block.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    out.extend_from_slice(&adler32(data).to_be_bytes());
    out
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(&[kind, data]).to_be_bytes());
}

/// Encodes the canvas as a PNG: 8-bit palette when it has at most 256 colors, else 8-bit RGB.
fn encode_png(c: &Canvas) -> Vec<u8> {
    let mut palette: Vec<[u8; 3]> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for p in &c.px {
        if palette.len() > 256 {
            break;
        }
        index.entry(*p).or_insert_with(|| {
            palette.push(*p);
            palette.len() - 1
        });
    }
    let indexed = palette.len() <= 256;
    let bpp = if indexed { 1 } else { 3 };
    // Each row starts with its filter type; 0 (None) since stored blocks gain nothing from filters.
    let mut raw = Vec::with_capacity(c.h * (1 + c.w * bpp));
    for row in c.px.chunks(c.w) {
        raw.push(0);
        for p in row {
            match index.get(p) {
                Some(&i) if indexed => raw.push(i as u8),
                _ => raw.extend_from_slice(p),
            }
        }
    }
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&(c.w as u32).to_be_bytes());
    ihdr.extend_from_slice(&(c.h as u32).to_be_bytes());
    // Bit depth 8; color type 3 (palette) or 2 (RGB); deflate; adaptive filtering; no interlace.
    ihdr.extend_from_slice(&[8, if indexed { 3 } else { 2 }, 0, 0, 0]);

    let mut out = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    chunk(&mut out, b"IHDR", &ihdr);
    if indexed {
        let plte: Vec<u8> = palette.iter().flatten().copied().collect();
        chunk(&mut out, b"PLTE", &plte);
    }
    chunk(&mut out, b"IDAT", &zlib_stored(&raw));
    chunk(&mut out, b"IEND", &[]);
    out
}

/// A decoded PNG: width, height and RGB pixels, after checking every structure and checksum (test
/// support: only the stored deflate blocks this module writes).
#[cfg(test)]
pub(crate) fn decode_png(b: &[u8]) -> (usize, usize, Vec<[u8; 3]>) {
    assert_eq!(&b[..8], &[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A]);
    let mut i = 8;
    let (mut w, mut h, mut color_type) = (0, 0, 0);
    let mut palette: Vec<[u8; 3]> = Vec::new();
    let mut idat = Vec::new();
    let mut kinds = Vec::new();
    while i < b.len() {
        let n = u32::from_be_bytes(b[i..i + 4].try_into().unwrap()) as usize;
        let kind: [u8; 4] = b[i + 4..i + 8].try_into().unwrap();
        let data = &b[i + 8..i + 8 + n];
        let crc = u32::from_be_bytes(b[i + 8 + n..i + 12 + n].try_into().unwrap());
        assert_eq!(crc, crc32(&[&kind, data]), "crc of {}", String::from_utf8_lossy(&kind));
        match &kind {
            b"IHDR" => {
                w = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
                h = u32::from_be_bytes(data[4..8].try_into().unwrap()) as usize;
                assert_eq!(data[8], 8);
                color_type = data[9];
                assert_eq!(&data[10..13], &[0, 0, 0]);
            }
            b"PLTE" => palette = data.chunks(3).map(|c| [c[0], c[1], c[2]]).collect(),
            b"IDAT" => idat.extend_from_slice(data),
            b"IEND" => assert!(data.is_empty()),
            other => panic!("unexpected chunk {other:?}"),
        }
        kinds.push(kind);
        i += 12 + n;
    }
    assert_eq!(i, b.len());
    assert_eq!(kinds.first(), Some(b"IHDR"));
    assert_eq!(kinds.last(), Some(b"IEND"));
    // zlib header, stored blocks, Adler-32.
    assert_eq!((u32::from(idat[0]) * 256 + u32::from(idat[1])) % 31, 0);
    assert_eq!(idat[0] & 0x0F, 8, "deflate");
    let mut j = 2;
    let mut raw = Vec::new();
    loop {
        let header = idat[j];
        assert_eq!(header & 0b110, 0, "stored block");
        let len = u16::from_le_bytes([idat[j + 1], idat[j + 2]]);
        let nlen = u16::from_le_bytes([idat[j + 3], idat[j + 4]]);
        assert_eq!(len, !nlen);
        raw.extend_from_slice(&idat[j + 5..j + 5 + len as usize]);
        j += 5 + len as usize;
        if header & 1 == 1 {
            break;
        }
    }
    assert_eq!(u32::from_be_bytes(idat[j..j + 4].try_into().unwrap()), adler32(&raw));
    assert_eq!(j + 4, idat.len());
    let bpp = if color_type == 3 { 1 } else { 3 };
    assert_eq!(raw.len(), h * (1 + w * bpp));
    let mut px = Vec::with_capacity(w * h);
    for row in raw.chunks(1 + w * bpp) {
        assert_eq!(row[0], 0, "filter none");
        for p in row[1..].chunks(bpp) {
            px.push(if bpp == 1 { palette[p[0] as usize] } else { [p[0], p[1], p[2]] });
        }
    }
    (w, h, px)
}

// ---------------------------------------------------------------------------------------------
// Heat maps.

/// A color ramp from dark blue (0) through teal and green to yellow (1), sampled at 64 levels so
/// the PNG keeps a palette.
fn ramp_color(t: f64) -> [u8; 3] {
    const STOPS: [[f64; 3]; 5] =
        [[68.0, 1.0, 84.0], [59.0, 82.0, 139.0], [33.0, 145.0, 140.0], [94.0, 201.0, 98.0], [253.0, 231.0, 37.0]];
    let t = ((t.clamp(0.0, 1.0) * 63.0).round() / 63.0) * (STOPS.len() - 1) as f64;
    let i = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - i as f64;
    let mut c = [0u8; 3];
    for (k, ch) in c.iter_mut().enumerate() {
        *ch = (STOPS[i][k] + (STOPS[i + 1][k] - STOPS[i][k]) * f).round() as u8;
    }
    c
}

/// Draws `rows` (one row per entity, one column per index; ragged rows are padded with blanks) as
/// a heat map of log10 of the values, with a color bar, into a PNG at `path`. Values ≤ 0 or not
/// finite are drawn in light grey. `y_label` names the rows (e.g. "module"), `x_label` the columns.
pub fn plot_heatmap(path: &Path, title: &str, x_label: &str, y_label: &str, rows: &[Vec<f32>]) -> Result<()> {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let n = rows.len().max(1);
    let logs: Vec<f64> =
        rows.iter().flatten().filter(|v| v.is_finite() && **v > 0.0).map(|&v| f64::from(v).log10()).collect();
    let lo = logs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() { (lo, if hi > lo { hi } else { lo + 1.0 }) } else { (0.0, 1.0) };
    let (left, top, right, bottom) = (70i64, 40i64, 110i64, 50i64);
    let cell_w = ((WIDTH as i64 - left - right) / cols as i64).max(1);
    let cell_h = ((HEIGHT as i64 - top - bottom) / n as i64).max(1);
    let (pw, ph) = (cell_w * cols as i64, cell_h * n as i64);
    let mut c = Canvas::new(WIDTH, HEIGHT);
    c.text((WIDTH as i64 - text_width(title, 2)) / 2, 10, title, 2, TEXT);
    for (ri, row) in rows.iter().enumerate() {
        for ci in 0..cols {
            let color = match row.get(ci) {
                Some(&v) if v.is_finite() && v > 0.0 => ramp_color((f64::from(v).log10() - lo) / (hi - lo)),
                Some(_) => [200, 200, 200],
                None => WHITE,
            };
            let (x0, y0) = (left + ci as i64 * cell_w, top + ri as i64 * cell_h);
            c.fill(x0, y0, x0 + cell_w - 1, y0 + cell_h - 1, color);
        }
    }
    c.hline(left - 1, left + pw, top - 1, FRAME);
    c.hline(left - 1, left + pw, top + ph, FRAME);
    c.vline(left - 1, top - 1, top + ph, FRAME);
    c.vline(left + pw, top - 1, top + ph, FRAME);
    // Column ticks: first, middle and last index; row ticks: first and last.
    for ci in [0, cols / 2, cols - 1] {
        let s = ci.to_string();
        c.text(left + ci as i64 * cell_w + (cell_w - text_width(&s, 1)) / 2, top + ph + 4, &s, 1, TEXT);
    }
    for ri in [0, n - 1] {
        let s = ri.to_string();
        c.text(left - 6 - text_width(&s, 1), top + ri as i64 * cell_h + (cell_h - 7) / 2, &s, 1, TEXT);
    }
    c.text(left + (pw - text_width(x_label, 1)) / 2, top + ph + 18, x_label, 1, TEXT);
    c.text(4, top + ph / 2, y_label, 1, TEXT);
    // Color bar with its log10 range.
    let bx = left + pw + 20;
    for y in 0..ph {
        let t = 1.0 - y as f64 / (ph - 1).max(1) as f64;
        c.hline(bx, bx + 14, top + y, ramp_color(t));
    }
    c.text(bx + 18, top, &format!("1e{hi:.1}"), 1, TEXT);
    c.text(bx + 18, top + ph - 7, &format!("1e{lo:.1}"), 1, TEXT);
    c.text(bx, top + ph + 4, "log10", 1, TEXT);
    crate::util::write_atomic(path, &encode_png(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("gristmill-plot-{name}-{}.png", std::process::id()))
    }

    #[test]
    fn checksums() {
        assert_eq!(crc32(&[b"123456789"]), 0xCBF4_3926);
        assert_eq!(crc32(&[b"1234", b"56789"]), 0xCBF4_3926);
        assert_eq!(crc32(&[b"IEND"]), 0xAE42_6082);
        assert_eq!(adler32(b""), 1);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
        assert_eq!(adler32(b"123456789"), 0x091E_01DE);
        // Long input: the deferred modulo must not overflow.
        let big = vec![0xFFu8; 100_000];
        let (mut a, mut b) = (1u64, 0u64);
        for &x in &big {
            a = (a + u64::from(x)) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!(adler32(&big), ((b << 16) | a) as u32);
    }

    #[test]
    fn zlib_blocks() {
        let data: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
        let z = zlib_stored(&data);
        // Three blocks: 65535 + 65535 + 18930, each with 5 header bytes.
        assert_eq!(z.len(), 2 + 3 * 5 + data.len() + 4);
        assert_eq!(z[2], 0);
        assert_eq!(z[2 + 5 + 65535], 0);
        assert_eq!(z[2 + 2 * (5 + 65535)], 1);
        let empty = zlib_stored(&[]);
        assert_eq!(empty, [0x78, 0x01, 1, 0, 0, 0xFF, 0xFF, 0, 0, 0, 1]);
    }

    #[test]
    fn ticks_are_nice() {
        let a = Axis::new(0.0, 1.0, 5);
        assert_eq!((a.lo, a.hi, a.step), (0.0, 1.0, 0.2));
        assert_eq!(a.labels(), ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        let a = Axis::new(1.0, 487.0, 8);
        assert_eq!((a.lo, a.hi, a.step), (0.0, 500.0, 100.0));
        assert_eq!(a.labels()[1], "100");
        let a = Axis::new(1.23, 2.61, 6);
        assert_eq!(a.step, 0.25);
        assert_eq!(a.labels()[0], "1.00");
        let a = Axis::new(-0.3, 0.3, 6);
        assert!(a.labels().contains(&"0.0".to_string()), "{:?}", a.labels());
        let a = Axis::new(0.0, 3e-5, 6);
        assert_eq!(a.labels()[1], "5e-6");
        let a = Axis::new(0.0, 2e7, 4);
        assert_eq!(a.labels()[1], "5e6");
        // Degenerate ranges open a window.
        let a = Axis::new(2.0, 2.0, 5);
        assert!(a.lo < 2.0 && a.hi > 2.0);
        let a = Axis::new(0.0, 0.0, 5);
        assert!(a.lo < 0.0 && a.hi > 0.0);
        let a = Axis::new(f64::INFINITY, f64::NEG_INFINITY, 5);
        assert_eq!((a.lo, a.hi), (0.0, 1.0));
        assert_eq!(format_exp(1.5e-5), "1.5e-5");
        assert_eq!(format_exp(0.0), "0");
        assert_eq!(format_exp(-2.5e-7), "-2.5e-7");
    }

    #[test]
    fn png_decodes_and_lines_are_where_the_data_is() {
        let path = tmp("lines");
        let train = Series::new("train", (0..=100).map(|i| (i as f64, 3.0 - 0.02 * i as f64)).collect(), 0);
        let eval = Series::new("eval", vec![(0.0, 2.0), (50.0, 2.0), (100.0, 2.0)], 1);
        plot_losses(&path, "Loss (run 1)", &[train.clone(), eval.clone()]).unwrap();
        let (w, h, px) = decode_png(&std::fs::read(&path).unwrap());
        assert_eq!((w, h), (WIDTH, HEIGHT));
        let at = |x: i64, y: i64| px[y as usize * w + x as usize];
        let l = Layout::new(&[train.clone(), eval.clone()]);
        // On the lines, away from the legend (top right) and from crossings.
        for x in [10.0, 30.0, 45.0] {
            let (px_, py) = l.map((x, 3.0 - 0.02 * x));
            assert_eq!(at(px_, py), train.color, "train at step {x}");
        }
        for x in [10.0, 40.0, 70.0] {
            let (px_, py) = l.map((x, 2.0));
            assert_eq!(at(px_, py), eval.color, "eval at step {x}");
        }
        // Background well away from everything, and the frame.
        let (bx, by) = l.map((83.0, 2.83));
        assert_eq!(at(bx, by), WHITE);
        assert_eq!(at(l.area.x0, (l.area.y0 + l.area.y1) / 2), FRAME);
        // Same pixels as the canvas we rendered.
        let c = render("Loss (run 1)", "step", "loss", &[train, eval]);
        assert_eq!(c.get(10, 10), px[10 * w + 10]);
        assert_eq!(c.px, px);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn degenerate_inputs_do_not_panic() {
        let path = tmp("degenerate");
        let cases: Vec<Vec<Series>> = vec![
            vec![],
            vec![Series::new("empty", vec![], 0)],
            vec![Series::new("one", vec![(5.0, 1.5)], 0)],
            vec![Series::new("flat", vec![(0.0, 2.0), (1.0, 2.0), (2.0, 2.0)], 0)],
            vec![Series::new("zeros", vec![(0.0, 0.0), (0.0, 0.0)], 0)],
            vec![Series::new("nan", vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, 0.5), (f64::INFINITY, 1.0)], 0)],
            vec![Series::new("all nan", vec![(f64::NAN, f64::NAN)], 0)],
            vec![Series::new("huge", vec![(0.0, -1e300), (1.0, 1e300)], 0)],
            vec![Series::new("tiny", vec![(0.0, 1e-12), (1e9, 2e-12)], 0)],
            vec![Series::new("ünïcode ✓ name", vec![(0.0, 1.0), (1.0, 2.0)], 9)],
        ];
        for series in &cases {
            plot_losses(&path, "degenerate", series).unwrap();
            let (w, h, _) = decode_png(&std::fs::read(&path).unwrap());
            assert_eq!((w, h), (WIDTH, HEIGHT));
        }
        // A lone point is marked, not invisible.
        let one = vec![Series::new("one", vec![(5.0, 1.5)], 2)];
        let l = Layout::new(&one);
        let c = render("", "step", "loss", &one);
        let (x, y) = l.map((5.0, 1.5));
        assert_eq!(c.get(x as usize, y as usize), COLORS[2]);
        // NaN breaks the line: nothing drawn between steps 0 and 2 at the midpoint height.
        let nan = vec![Series::new("nan", vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, 0.0)], 3)];
        let l = Layout::new(&nan);
        let c = render("", "step", "loss", &nan);
        let (x, y) = l.map((1.0, 0.5));
        assert_ne!(c.get(x as usize, y as usize), COLORS[3]);
        let _ = std::fs::remove_file(&path);
        // An unwritable path is an error, not a panic.
        assert!(plot_losses(Path::new("/nonexistent/dir/plot.png"), "x", &one).is_err());
    }

    #[test]
    fn dashed_lines_have_gaps() {
        let flat =
            vec![Series::new("val", vec![(0.0, 1.0), (100.0, 1.0)], 1).dashed(), Series::new("x", vec![(0.0, 0.0)], 0)];
        let l = Layout::new(&flat);
        let c = render("", "step", "loss", &flat);
        let (x0, y) = l.map((0.0, 1.0));
        let (x1, _) = l.map((60.0, 1.0));
        let on = (x0..x1).filter(|&x| c.get(x as usize, y as usize) == COLORS[1]).count();
        let span = (x1 - x0) as usize;
        // Half drawn, half skipped, give or take a dash.
        assert!(on > span / 3 && on < 2 * span / 3, "{on} of {span} pixels drawn");
    }

    #[test]
    fn many_colors_fall_back_to_rgb() {
        let mut c = Canvas::new(20, 20);
        for (i, p) in c.px.iter_mut().enumerate() {
            *p = [i as u8, (i / 256) as u8, 7];
        }
        let (w, h, px) = decode_png(&encode_png(&c));
        assert_eq!((w, h), (20, 20));
        assert_eq!(px, c.px);
    }

    #[test]
    fn heatmap_writes_a_png_with_the_ramp_colors() {
        let dir = std::env::temp_dir().join(format!("gristmill-heat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("h.png");
        let rows = vec![vec![1e-3f32, 1e-1, 10.0], vec![1.0, 0.0], vec![f32::NAN, 5.0, 2.0]];
        plot_heatmap(&path, "eigs", "index", "module", &rows).unwrap();
        let (w, h, px) = decode_png(&std::fs::read(&path).unwrap());
        assert_eq!((w, h), (WIDTH, HEIGHT));
        // The smallest value gets the ramp's first color, the largest its last; non-positive and
        // non-finite values are grey.
        for c in [ramp_color(0.0), ramp_color(1.0), [200, 200, 200]] {
            assert!(px.contains(&c), "{c:?} missing");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
