//! Safetensors checkpoints: memory-mapped reading (single files and shards) and atomic writing.

use crate::error::{Error, Result};
use gristmill_core::bnb::{BnbNames, QUANT_STATE_SUFFIX, RawTensor, TensorSource, from_bnb_tensors};
use gristmill_core::nf4::Nf4Tensor;
use gristmill_core::{DType, Shape};
use memmap2::Mmap;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// safetensors' name for a dtype. NF4 has none: bitsandbytes stores packed codes as U8.
pub fn st_dtype(d: DType) -> safetensors::Dtype {
    match d {
        DType::F32 => safetensors::Dtype::F32,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F16 => safetensors::Dtype::F16,
        DType::U8 | DType::NF4 => safetensors::Dtype::U8,
    }
}

struct WriteView<'a>(&'a RawTensor<'a>);

impl safetensors::View for WriteView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        st_dtype(self.0.dtype)
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.0.data)
    }
    fn data_len(&self) -> usize {
        self.0.data.len()
    }
}

/// Writes `tensors` to `path` as one safetensors file, atomically: the bytes go to a temporary
/// file beside it, which is renamed over `path` only once complete, so an interrupted write never
/// leaves a damaged checkpoint behind.
pub fn write_safetensors(
    path: &Path,
    tensors: &[RawTensor<'_>],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    for t in tensors {
        let expected = t.dtype.storage_bytes(t.shape.iter().product())?;
        if t.data.len() != expected {
            return Err(Error::tensor(
                &t.name,
                format!("{} bytes for shape {:?} of {}: expected {expected}", t.data.len(), t.shape, t.dtype),
            ));
        }
    }
    let tmp = crate::util::tmp_path(path);
    let views = tensors.iter().map(|t| (t.name.as_str(), WriteView(t)));
    if let Err(e) = safetensors::serialize_to_file(views, metadata, &tmp) {
        // A full disk fails here: the old file at `path` is untouched, and no partial one stays.
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::format(&tmp, e.to_string()));
    }
    // On disk before the rename, so a crash never leaves `path` naming a file whose data is lost.
    if let Err(e) = std::fs::File::open(&tmp).and_then(|f| f.sync_all()) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// The safetensors crate's limit on the JSON header; a larger one would be unreadable.
const MAX_HEADER_BYTES: usize = 100_000_000;

/// Writes one safetensors file a tensor at a time, so that a large checkpoint never has to be in
/// memory all at once (an import holds one converted tensor, not the whole model).
///
/// Every tensor's name, dtype and shape is given up front: the JSON header, which holds every
/// tensor's data offsets, comes first in the file. The header is the one [`write_safetensors`]
/// (that is, the safetensors crate) writes for the same tensors, so the file is byte for byte the
/// same: tensors sorted by descending dtype alignment, then by name, header padded with spaces to
/// a multiple of 8 bytes, `__metadata__` first when given.
///
/// The data must then be handed to [`write_tensor`](Self::write_tensor) **in header order**, the
/// order [`names`](Self::names) lists (each tensor's bytes follow the previous one's in the file,
/// so any other order would need seeking or buffering). An out-of-order, duplicate or wrong-size
/// write is an error, as is [`finish`](Self::finish) before every tensor is written.
///
/// The bytes go to a temporary file beside `path` (see [`crate::util::tmp_path`]); only `finish`
/// syncs it and renames it over `path`. After an error the writer refuses further writes, and a
/// writer dropped without a successful `finish` deletes its temporary file, so a failed or
/// abandoned write never leaves a partial file at `path` nor replaces what was there.
pub struct SafetensorsStreamWriter {
    path: PathBuf,
    tmp: PathBuf,
    /// `None` once finished or after a failed `finish`.
    file: Option<std::io::BufWriter<File>>,
    /// (name, bytes of data) in header order.
    order: Vec<(String, usize)>,
    /// Position of each name in `order`, to tell a duplicate from an out-of-order write.
    index: HashMap<String, usize>,
    /// How many tensors of `order` have been written.
    next: usize,
    /// Set by any failed write: the file's contents are then unknown.
    failed: bool,
    /// Set once the temporary file has been renamed into place.
    done: bool,
    /// Bytes of the whole file (length field, header and data).
    total: u64,
}

impl std::fmt::Debug for SafetensorsStreamWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsStreamWriter")
            .field("path", &self.path)
            .field("tensors", &self.order.len())
            .field("written", &self.next)
            .finish()
    }
}

impl SafetensorsStreamWriter {
    /// Starts writing `path`: checks the tensor list (no duplicate names, sizes that fit), creates
    /// the temporary file and writes the header. `tensors` is (name, dtype, shape) for every
    /// tensor the file will hold, in any order.
    pub fn create(
        path: &Path,
        tensors: Vec<(String, DType, Vec<usize>)>,
        metadata: Option<HashMap<String, String>>,
    ) -> Result<Self> {
        // The crate's order (`safetensors::tensor::prepare`): descending dtype, then name. Its
        // writer puts the widest types first so that they stay aligned; following it makes the
        // file identical to `write_safetensors`'s.
        let mut specs = tensors;
        specs.sort_by(|(ln, ld, _), (rn, rd, _)| st_dtype(*rd).cmp(&st_dtype(*ld)).then_with(|| ln.cmp(rn)));
        let mut infos = Vec::with_capacity(specs.len());
        let mut order = Vec::with_capacity(specs.len());
        let mut index = HashMap::with_capacity(specs.len());
        let mut offset = 0usize;
        for (name, dtype, shape) in specs {
            let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let bytes = numel.and_then(|n| dtype.storage_bytes(n).ok());
            let end = bytes.and_then(|b| offset.checked_add(b));
            let (Some(bytes), Some(end)) = (bytes, end) else {
                return Err(Error::tensor(&name, format!("{dtype} × {shape:?} is too large to write")));
            };
            // The crate's `Metadata` keeps one entry per name and would silently drop the first.
            if index.insert(name.clone(), order.len()).is_some() {
                return Err(Error::tensor(&name, format!("listed twice for {}", path.display())));
            }
            infos.push((
                name.clone(),
                safetensors::tensor::TensorInfo { dtype: st_dtype(dtype), shape, data_offsets: (offset, end) },
            ));
            order.push((name, bytes));
            offset = end;
        }
        // The header is serialized by the crate itself, so that it cannot drift from what
        // `write_safetensors` and every reader expect.
        let meta = safetensors::tensor::Metadata::new(metadata, infos)
            .map_err(|e| Error::format(path, format!("cannot build the safetensors header: {e}")))?;
        let mut header = serde_json::to_string(&meta)
            .map_err(|e| Error::format(path, format!("cannot serialize the safetensors header: {e}")))?
            .into_bytes();
        // The format requires the data to start at a multiple of 8 bytes; spaces are valid JSON.
        header.resize(header.len().next_multiple_of(8), b' ');
        if header.len() > MAX_HEADER_BYTES {
            return Err(Error::format(
                path,
                format!("safetensors header of {} bytes is over the limit of {MAX_HEADER_BYTES}", header.len()),
            ));
        }
        let total = (8 + header.len() as u64).saturating_add(offset as u64);

        let tmp = crate::util::tmp_path(path);
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        // From here on, dropping `w` (on any error below) removes the temporary file.
        let mut w = Self {
            path: path.to_path_buf(),
            tmp,
            file: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
            order,
            index,
            next: 0,
            failed: false,
            done: false,
            total,
        };
        w.write_raw(&(header.len() as u64).to_le_bytes())?;
        w.write_raw(&header)?;
        Ok(w)
    }

    /// The tensor names in header order: the order [`write_tensor`](Self::write_tensor) expects.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.order.iter().map(|(n, _)| n.as_str())
    }

    /// The name the next [`write_tensor`](Self::write_tensor) must give, or `None` when every
    /// tensor has been written.
    pub fn next_name(&self) -> Option<&str> {
        self.order.get(self.next).map(|(n, _)| n.as_str())
    }

    /// Writes the data of `name` (little-endian, exactly dtype × shape bytes), which must be the
    /// next tensor in header order.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        if self.failed {
            return Err(Error::tensor(name, format!("{}: an earlier write failed", self.path.display())));
        }
        let result = self.check_next(name, data.len()).and_then(|()| self.write_raw(data));
        // Refuse everything after a failure: a caller that ignored one error must not be able to
        // finish a file that lacks a tensor.
        match result {
            Ok(()) => {
                self.next += 1;
                Ok(())
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    fn check_next(&self, name: &str, len: usize) -> Result<()> {
        let Some((want, bytes)) = self.order.get(self.next) else {
            return Err(match self.index.get(name) {
                Some(_) => Error::tensor(name, "written twice"),
                None => Error::tensor(name, format!("not in the header of {}", self.path.display())),
            });
        };
        if want != name {
            return Err(match self.index.get(name) {
                Some(&i) if i < self.next => Error::tensor(name, "written twice"),
                Some(_) => Error::tensor(name, format!("written out of order: `{want}` comes first in the header")),
                None => Error::tensor(name, format!("not in the header of {}", self.path.display())),
            });
        }
        if len != *bytes {
            return Err(Error::tensor(name, format!("{len} bytes of data, but the header says {bytes}")));
        }
        Ok(())
    }

    fn write_raw(&mut self, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        let Some(f) = self.file.as_mut() else {
            return Err(Error::format(&self.path, "the writer is already finished"));
        };
        f.write_all(bytes).map_err(|e| Error::io(&self.tmp, e))
    }

    /// Checks that every tensor was written, syncs the temporary file to disk and renames it over
    /// the destination. Returns the size of the file in bytes.
    pub fn finish(mut self) -> Result<u64> {
        if self.failed {
            return Err(Error::format(&self.path, "not finished: an earlier write failed"));
        }
        if let Some((name, _)) = self.order.get(self.next) {
            let left = self.order.len() - self.next;
            return Err(Error::tensor(
                name,
                format!("never written ({left} of {} tensors missing from {})", self.order.len(), self.path.display()),
            ));
        }
        let Some(w) = self.file.take() else {
            return Err(Error::format(&self.path, "the writer is already finished"));
        };
        let file = w.into_inner().map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        // Synced before the rename: otherwise a crash could leave the new name on a file whose
        // data never reached the disk.
        file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        self.done = true;
        Ok(self.total)
    }
}

impl Drop for SafetensorsStreamWriter {
    fn drop(&mut self) {
        if !self.done {
            // Close before deleting (required on Windows); errors are moot: the file is garbage.
            self.file.take();
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/// The index HF writes beside a sharded checkpoint (`weight_map`: tensor name → shard file).
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The file name of an unsharded HF checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// An index larger than this is not an index: refuse it rather than read it into memory. The
/// index of a 405B-parameter model is well under 1 MiB.
const MAX_INDEX_BYTES: u64 = 64 << 20;

/// Where one tensor lives: which mapped file, and its byte range inside that whole file.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file (header included), checked against the file's length.
    start: usize,
    end: usize,
}

/// A memory-mapped safetensors checkpoint: one file, or the shards an index names.
///
/// Opening maps every file and reads every header once (validated by the safetensors crate);
/// tensor data is never copied until asked for, and a float32 tensor can be borrowed in place
/// ([`Checkpoint::f32_slice`]).
pub struct Checkpoint {
    /// The path it was opened with (a file, an index or a directory), for messages.
    path: PathBuf,
    files: Vec<PathBuf>,
    maps: Vec<Mmap>,
    /// Sorted by name, so listings are deterministic.
    entries: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("files", &self.files)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

/// A borrowed view of one tensor of a [`Checkpoint`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    /// Little-endian element bytes, exactly `dtype × shape` long.
    pub data: &'a [u8],
    /// The file that holds it.
    pub file: &'a Path,
}

impl TensorRef<'_> {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        // The safetensors crate checked this product for overflow when it read the header.
        self.shape.iter().product()
    }
}

/// What a header says about one tensor, whatever its dtype (including those gristmill does not
/// compute with, such as F64 or I64): for listings and inspection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TensorMeta<'a> {
    pub name: &'a str,
    /// The dtype as the file names it.
    pub st_dtype: safetensors::Dtype,
    pub shape: &'a [usize],
    /// Bytes of data in the file.
    pub nbytes: usize,
    pub file: &'a Path,
}

impl TensorMeta<'_> {
    /// The gristmill dtype, when gristmill reads this one.
    pub fn dtype(&self) -> Option<DType> {
        gristmill_dtype(self.st_dtype)
    }

    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// How [`Checkpoint::load_weight`] should hand a linear-layer weight over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadAs {
    /// Dense f32 values (a 4-bit weight is dequantized).
    F32,
    /// NF4 with double quantization (a dense weight is quantized): the QLoRA base.
    Nf4,
}

/// A linear-layer weight as [`Checkpoint::load_weight`] returns it.
// The NF4 variant carries its 1 KiB nested code book inline (as `Absmax` does in the core): one
// per weight matrix, so boxing it would only add an indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum LoadedWeight {
    /// Row-major values of `shape` (e.g. (out, in)).
    F32 {
        shape: Vec<usize>,
        data: Vec<f32>,
    },
    Nf4(Nf4Tensor),
}

impl LoadedWeight {
    /// The logical shape of the weight, e.g. (out, in).
    pub fn shape(&self) -> &[usize] {
        match self {
            LoadedWeight::F32 { shape, .. } => shape,
            LoadedWeight::Nf4(t) => t.shape.dims(),
        }
    }
}

/// gristmill's dtype for a safetensors dtype, or `None` for the ones it does not read.
pub fn gristmill_dtype(d: safetensors::Dtype) -> Option<DType> {
    match d {
        safetensors::Dtype::F32 => Some(DType::F32),
        safetensors::Dtype::BF16 => Some(DType::BF16),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::U8 => Some(DType::U8),
        _ => None,
    }
}

impl Checkpoint {
    /// Opens a checkpoint: a `.safetensors` file, a `*.safetensors.index.json` (every shard it
    /// names is mapped once), or a directory holding either (the index wins when both exist).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let target = if meta.is_dir() { resolve_dir(path)? } else { path.to_path_buf() };
        let is_index = target.file_name().is_some_and(|n| n.to_string_lossy().ends_with(".json"));
        let mut ck = if is_index { Self::open_index(&target)? } else { Self::open_single(&target)? };
        ck.path = path.to_path_buf();
        Ok(ck)
    }

    fn open_single(file: &Path) -> Result<Self> {
        let map = map_file(file)?;
        let entries = read_header(0, file, &map)?.into_iter().collect();
        Ok(Self { path: file.to_path_buf(), files: vec![file.to_path_buf()], maps: vec![map], entries })
    }

    fn open_index(index: &Path) -> Result<Self> {
        let weight_map = read_index(index)?;
        let dir = index.parent().unwrap_or_else(|| Path::new("."));
        // Distinct shards, sorted, each mapped once however many tensors it holds.
        let mut shards: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, shard) in &weight_map {
            shards.entry(shard.as_str()).or_default().push(name.as_str());
        }
        let mut files = Vec::with_capacity(shards.len());
        let mut maps = Vec::with_capacity(shards.len());
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        for (i, (shard, names)) in shards.iter().enumerate() {
            let file = dir.join(shard);
            if !file.is_file() {
                return Err(Error::format(
                    index,
                    format!(
                        "shard `{shard}` (named for {} tensors, e.g. `{}`) does not exist: looked for {}",
                        names.len(),
                        names.first().copied().unwrap_or_default(),
                        file.display()
                    ),
                ));
            }
            let map = map_file(&file)?;
            for (name, entry) in read_header(i, &file, &map)? {
                if let Some(prev) = entries.get(&name) {
                    return Err(Error::tensor(
                        &name,
                        format!(
                            "stored twice: in {} and in {}",
                            files_or(&files, prev.file, &file).display(),
                            file.display()
                        ),
                    ));
                }
                entries.insert(name, entry);
            }
            files.push(file);
            maps.push(map);
        }
        // Every tensor the index names must be where it says.
        for (name, shard) in &weight_map {
            let want = dir.join(shard);
            match entries.get(name) {
                Some(e) if files[e.file] == want => {}
                Some(e) => {
                    return Err(Error::tensor(
                        name,
                        format!(
                            "{} puts it in {}, but it is stored in {}",
                            index.display(),
                            want.display(),
                            files[e.file].display()
                        ),
                    ));
                }
                None => {
                    return Err(Error::tensor(
                        name,
                        format!("{} puts it in {}, which does not hold it", index.display(), want.display()),
                    ));
                }
            }
        }
        Ok(Self { path: index.to_path_buf(), files, maps, entries })
    }

    /// The path the checkpoint was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The safetensors files mapped (one, or every shard), sorted.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the checkpoint holds no tensor at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether a tensor `name` exists (whatever its dtype).
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.entries.keys().map(String::as_str).collect()
    }

    /// What the header says about `name`, whatever its dtype.
    pub fn meta(&self, name: &str) -> Option<TensorMeta<'_>> {
        self.entries.get_key_value(name).map(|(k, e)| self.meta_of(k, e))
    }

    /// [`TensorMeta`] of every tensor, sorted by name.
    pub fn metas(&self) -> impl Iterator<Item = TensorMeta<'_>> + '_ {
        self.entries.iter().map(|(k, e)| self.meta_of(k, e))
    }

    fn meta_of<'a>(&'a self, name: &'a str, e: &'a Entry) -> TensorMeta<'a> {
        TensorMeta { name, st_dtype: e.dtype, shape: &e.shape, nbytes: e.end - e.start, file: &self.files[e.file] }
    }

    /// The tensor `name`. Fails when it is missing (suggesting a close name when there is one)
    /// or stored in a dtype gristmill does not read (F64, I64, F8…).
    pub fn get(&self, name: &str) -> Result<TensorRef<'_>> {
        let Some((key, e)) = self.entries.get_key_value(name) else {
            return Err(self.missing(name));
        };
        let dtype = gristmill_dtype(e.dtype).ok_or_else(|| {
            Error::tensor(name, format!("dtype {} is not supported (gristmill reads F32, BF16, F16 and U8)", e.dtype))
        })?;
        let file = &self.files[e.file];
        // The range was checked against the mapping when the header was read; `get` keeps a
        // corrupted index from ever becoming a panic.
        let data = self.maps[e.file]
            .get(e.start..e.end)
            .ok_or_else(|| Error::format(file, format!("tensor `{name}` lies outside the file")))?;
        Ok(TensorRef { name: key, dtype, shape: &e.shape, data, file })
    }

    fn missing(&self, name: &str) -> Error {
        let mut msg = format!("not found in {}", self.path.display());
        if let Some(s) = suggest(name, self.entries.keys().map(String::as_str)) {
            msg.push_str(&format!(" (did you mean `{s}`?)"));
        }
        Error::tensor(name, msg)
    }

    /// The float tensor `name` as f32 (bf16 and f16 convert exactly).
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.f32_slice(name).map(Cow::into_owned)
    }

    /// The float tensor `name` as f32, borrowed from the mapping when it is stored as F32 at a
    /// 4-byte-aligned offset (the usual case: writers put 4-byte types first), converted otherwise.
    pub fn f32_slice(&self, name: &str) -> Result<Cow<'_, [f32]>> {
        let t = self.get(name)?;
        match t.dtype {
            DType::F32 => {
                // The file is little-endian; only a little-endian host can reinterpret it in place.
                if cfg!(target_endian = "little")
                    && let Ok(s) = bytemuck::try_cast_slice::<u8, f32>(t.data)
                {
                    return Ok(Cow::Borrowed(s));
                }
                Ok(Cow::Owned(t.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
            }
            DType::BF16 => Ok(Cow::Owned(
                t.data
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                    .collect(),
            )),
            DType::F16 => Ok(Cow::Owned(
                t.data
                    .chunks_exact(2)
                    .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                    .collect(),
            )),
            d @ (DType::U8 | DType::NF4) => {
                Err(Error::tensor(name, format!("is {d}, not a float tensor (F32, BF16 or F16)")))
            }
        }
    }

    /// Whether `name` is stored pre-quantized by bitsandbytes (its quant state exists).
    pub fn is_bnb_4bit(&self, name: &str) -> bool {
        self.entries.contains_key(&BnbNames::for_weight(name).quant_state)
    }

    /// Loads the linear-layer weight `name`.
    ///
    /// A bitsandbytes 4-bit weight is read as stored (and dequantized, with its original shape,
    /// when [`LoadAs::F32`] is asked); a dense F32/BF16/F16 weight is returned as f32, or
    /// quantized to NF4 with double quantization exactly as bitsandbytes would.
    pub fn load_weight(&self, name: &str, as_: LoadAs) -> Result<LoadedWeight> {
        if self.is_bnb_4bit(name) {
            let t = from_bnb_tensors(name, self)?;
            return match as_ {
                LoadAs::Nf4 => Ok(LoadedWeight::Nf4(t)),
                LoadAs::F32 => {
                    let data = t.dequantize()?;
                    Ok(LoadedWeight::F32 { shape: t.shape.dims().to_vec(), data })
                }
            };
        }
        let t = self.get(name)?;
        if !t.dtype.is_float() {
            return Err(Error::tensor(
                name,
                format!(
                    "is {} but has no bitsandbytes quant state (`{name}.{QUANT_STATE_SUFFIX}`); \
                     a weight must be F32, BF16, F16 or bitsandbytes 4-bit",
                    t.dtype
                ),
            ));
        }
        let (shape, dtype) = (t.shape.to_vec(), t.dtype);
        let data = self.to_f32(name)?;
        match as_ {
            LoadAs::F32 => Ok(LoadedWeight::F32 { shape, data }),
            LoadAs::Nf4 => {
                let shape = Shape::new(shape).map_err(|e| Error::tensor(name, e.to_string()))?;
                Nf4Tensor::quantize(&data, shape, dtype, true)
                    .map(LoadedWeight::Nf4)
                    .map_err(|e| Error::tensor(name, format!("quantizing to NF4: {e}")))
            }
        }
    }
}

/// Side tensors of a 4-bit weight are looked up through this; a tensor in a dtype gristmill does
/// not read counts as absent, so `from_bnb_tensors` reports it by name as missing.
impl TensorSource for Checkpoint {
    fn tensor(&self, name: &str) -> Option<RawTensor<'_>> {
        let t = self.get(name).ok()?;
        Some(RawTensor {
            name: t.name.to_string(),
            dtype: t.dtype,
            shape: t.shape.to_vec(),
            data: Cow::Borrowed(t.data),
        })
    }
}

/// `files[i]`, or `fallback` when `i` is the shard being read (not yet pushed).
fn files_or<'a>(files: &'a [PathBuf], i: usize, fallback: &'a Path) -> &'a Path {
    files.get(i).map_or(fallback, PathBuf::as_path)
}

/// Which file of a directory to open: the HF names first, then a lone index or a lone file.
fn resolve_dir(dir: &Path) -> Result<PathBuf> {
    for name in [INDEX_FILE, SINGLE_FILE] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    let mut indexes = Vec::new();
    let mut singles = Vec::new();
    for ent in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = ent.map_err(|e| Error::io(dir, e))?.path();
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // Our own temporary files (`.name.tmp`) and other dot files are not candidates.
        if name.starts_with('.') || !p.is_file() {
            continue;
        }
        if name.ends_with(".safetensors.index.json") {
            indexes.push(p);
        } else if name.ends_with(".safetensors") {
            singles.push(p);
        }
    }
    indexes.sort();
    singles.sort();
    match (indexes.as_slice(), singles.as_slice()) {
        ([one], _) | ([], [one]) => Ok(one.clone()),
        ([], []) => Err(Error::format(
            dir,
            format!("no {SINGLE_FILE}, {INDEX_FILE} or other .safetensors file in this directory"),
        )),
        ([], many) | (many, _) => Err(Error::format(
            dir,
            format!(
                "holds several candidates and neither {INDEX_FILE} nor {SINGLE_FILE}: {}; name the file to open",
                many.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// Reads `weight_map` of a shard index. Shard names must be relative paths inside the index's
/// directory: an index cannot send the loader elsewhere on the disk.
fn read_index(index: &Path) -> Result<BTreeMap<String, String>> {
    let len = std::fs::metadata(index).map_err(|e| Error::io(index, e))?.len();
    if len > MAX_INDEX_BYTES {
        return Err(Error::format(index, format!("{len} bytes is too large for a shard index")));
    }
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::format(index, format!("invalid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| Error::format(index, "no `weight_map` object: not a safetensors shard index"))?;
    let mut out = BTreeMap::new();
    for (name, shard) in map {
        let shard = shard.as_str().ok_or_else(|| {
            Error::format(index, format!("weight_map entry of `{name}` should be a file name, found {shard}"))
        })?;
        let plain = Path::new(shard).components().all(|c| matches!(c, std::path::Component::Normal(_)));
        if shard.is_empty() || !plain {
            return Err(Error::format(
                index,
                format!("weight_map puts `{name}` in `{shard}`: shard names must be relative paths without `..`"),
            ));
        }
        out.insert(name.clone(), shard.to_string());
    }
    Ok(out)
}

/// Maps `path` read-only.
fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len < 8 {
        // Also keeps us from mapping an empty file, which some platforms refuse.
        return Err(Error::format(
            path,
            format!("{len} bytes is too short for a safetensors file (8-byte header length)"),
        ));
    }
    // SAFETY: the mapping is read-only (the file is opened read-only and mapped with
    // `Mmap::map`, never `MmapMut`), and every access goes through slices bounds-checked against
    // the length the mapping had when it was made. What Rust cannot rule out is another process
    // modifying or truncating the file while it is mapped: modified bytes would change tensor
    // values under us (not memory safety in practice: we only read plain bytes), and truncation
    // would make later reads of the lost pages raise SIGBUS. Every mmap-based loader (safetensors,
    // candle, llama.cpp) accepts this: checkpoints are not edited in place while a model runs,
    // and our own writer replaces files by rename, which leaves an existing mapping intact.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(map)
}

/// Reads and validates the header of the mapped file `path` (number `file` of the checkpoint).
fn read_header(file: usize, path: &Path, buf: &[u8]) -> Result<Vec<(String, Entry)>> {
    // read_metadata checks the header length against its 100 MB limit and the buffer, parses the
    // JSON, and checks that the data offsets tile the data exactly and match dtype × shape, so
    // no field of the header is trusted below without having been checked against the file.
    let (n, md) = safetensors::SafeTensors::read_metadata(buf).map_err(|e| Error::format(path, describe(buf, &e)))?;
    let base = 8usize.checked_add(n).ok_or_else(|| Error::format(path, "header length overflows"))?;
    let mut out = Vec::with_capacity(md.tensors().len());
    for (name, info) in md.tensors() {
        let (s, e) = info.data_offsets;
        let range = base.checked_add(s).zip(base.checked_add(e)).filter(|&(s, e)| s <= e && e <= buf.len());
        let Some((start, end)) = range else {
            return Err(Error::format(path, format!("tensor `{name}`: data_offsets [{s}, {e}] lie outside the file")));
        };
        out.push((name, Entry { file, dtype: info.dtype, shape: info.shape.clone(), start, end }));
    }
    Ok(out)
}

/// A message for a header the safetensors crate refused, as precise as the bytes allow.
fn describe(buf: &[u8], e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    let n = buf.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_le_bytes).unwrap_or(0);
    match e {
        E::HeaderTooSmall => format!("{} bytes is too short for a safetensors file", buf.len()),
        E::HeaderTooLarge => format!(
            "header length field says {n} bytes, over the safetensors limit of 100000000: \
             not a safetensors file, or a damaged one"
        ),
        E::InvalidHeaderLength => format!(
            "header length field says {n} bytes but only {} follow it: truncated inside the header, \
             or not a safetensors file",
            buf.len().saturating_sub(8)
        ),
        E::InvalidHeader(u) => format!("header is not UTF-8: {u}"),
        E::InvalidHeaderDeserialization(j) => format!("header is not a valid safetensors JSON header: {j}"),
        E::InvalidOffset(_)
        | E::TensorInvalidInfo
        | E::MetadataIncompleteBuffer
        | E::ValidationOverflow
        | E::MisalignedSlice => diagnose_layout(buf).unwrap_or_else(|| format!("bad header: {e}")),
        _ => format!("bad header: {e}"),
    }
}

/// Finds the first tensor whose data_offsets or size are wrong. Only called after the safetensors
/// crate refused the file, when its header is known to lie inside the buffer and to parse.
fn diagnose_layout(buf: &[u8]) -> Option<String> {
    let n = usize::try_from(u64::from_le_bytes(buf.get(..8)?.try_into().ok()?)).ok()?;
    let header = buf.get(8..8usize.checked_add(n)?)?;
    let data_len = buf.len() - 8 - n;
    let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
    let mut items = Vec::new();
    for (name, v) in obj.iter().filter(|(k, _)| *k != "__metadata__") {
        let info: safetensors::tensor::TensorInfo = serde_json::from_value(v.clone()).ok()?;
        items.push((name, info));
    }
    items.sort_by_key(|(_, i)| i.data_offsets);
    let mut at = 0usize;
    for (name, info) in &items {
        let (s, e) = info.data_offsets;
        let dt = info.dtype;
        if e < s {
            return Some(format!("tensor `{name}`: data_offsets [{s}, {e}] end before they start"));
        }
        if s != at {
            return Some(format!(
                "tensor `{name}`: data_offsets [{s}, {e}] start at {s} but the previous tensor ends at {at} \
                 (tensors must tile the data without gaps or overlaps)"
            ));
        }
        let bits =
            info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).and_then(|n| n.checked_mul(dt.bitsize()));
        let Some(bits) = bits else {
            return Some(format!("tensor `{name}`: shape {:?} of {dt} overflows", info.shape));
        };
        if bits % 8 != 0 {
            return Some(format!("tensor `{name}`: shape {:?} of {dt} is not a whole number of bytes", info.shape));
        }
        if e - s != bits / 8 {
            return Some(format!(
                "tensor `{name}`: {dt} × {:?} needs {} bytes but its data_offsets [{s}, {e}] span {}",
                info.shape,
                bits / 8,
                e - s
            ));
        }
        if e > data_len {
            return Some(format!(
                "tensor `{name}`: data_offsets [{s}, {e}] point past the end of the data ({data_len} bytes \
                 follow the header): the file is truncated or its header is wrong"
            ));
        }
        at = e;
    }
    (at != data_len).then(|| {
        format!("the tensors end at byte {at} of the data but {data_len} bytes follow the header: trailing bytes")
    })
}

/// The name closest to `name`, when one is close enough to be a plausible typo or prefix slip.
fn suggest<'a>(name: &str, names: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    // A different prefix (`model.` or not, `base_model.model.`) is the most common slip: prefer a
    // name that ends with the other at a dot boundary.
    let mut best: Option<(usize, &str)> = None;
    let limit = (name.chars().count() / 4).max(2);
    for cand in names {
        let prefix_slip = cand.strip_suffix(name).is_some_and(|p| p.ends_with('.'))
            || name.strip_suffix(cand).is_some_and(|p| p.ends_with('.'));
        let score = if prefix_slip {
            0
        } else if cand.len().abs_diff(name.len()) > limit {
            continue;
        } else {
            match crate::util::edit_distance(name, cand) {
                d if d <= limit => d + 1,
                _ => continue,
            }
        };
        if best.is_none_or(|(b, _)| score < b) {
            best = Some((score, cand));
        }
    }
    best.map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gristmill_core::bnb::to_bnb_tensors;
    use gristmill_core::rng::Rng;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("gristmill-st-{}-{tag}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
        fn join(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn raw(name: &str, dtype: DType, shape: &[usize], data: Vec<u8>) -> RawTensor<'static> {
        RawTensor { name: name.into(), dtype, shape: shape.to_vec(), data: Cow::Owned(data) }
    }

    fn f32_raw(name: &str, shape: &[usize], v: &[f32]) -> RawTensor<'static> {
        raw(name, DType::F32, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    fn bf16_raw(name: &str, shape: &[usize], v: &[f32]) -> RawTensor<'static> {
        raw(name, DType::BF16, shape, v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect())
    }

    /// A safetensors file from a header JSON and data bytes, written as is (for damaged files).
    fn handmade(path: &Path, header: &str, data: &[u8]) {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend_from_slice(data);
        std::fs::write(path, b).unwrap();
    }

    fn err_of<T: std::fmt::Debug>(r: Result<T>) -> String {
        format!("{}", r.unwrap_err())
    }

    #[test]
    fn round_trip_every_dtype() {
        let dir = TempDir::new("rt");
        let path = dir.join("model.safetensors");
        let vals = [1.0f32, -2.5, 0.15625, 0.00390625, 1024.0, -0.0];
        let tensors = vec![
            f32_raw("a.f32", &[2, 3], &vals),
            bf16_raw("b.bf16", &[3, 2], &vals),
            raw("c.f16", DType::F16, &[6], vals.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect()),
            raw("d.u8", DType::U8, &[5], vec![0, 1, 2, 254, 255]),
            raw("e.scalar", DType::F32, &[], 7.0f32.to_le_bytes().to_vec()),
        ];
        write_safetensors(&path, &tensors, None).unwrap();
        let ck = Checkpoint::open(&path).unwrap();
        assert_eq!(ck.names(), ["a.f32", "b.bf16", "c.f16", "d.u8", "e.scalar"]);
        assert_eq!(ck.files(), std::slice::from_ref(&path));
        assert_eq!(ck.len(), 5);
        for t in &tensors {
            let r = ck.get(&t.name).unwrap();
            assert_eq!(
                (r.name, r.dtype, r.shape, r.data, r.file),
                (t.name.as_str(), t.dtype, &t.shape[..], &t.data[..], path.as_path())
            );
            assert!(ck.contains(&t.name));
        }
        assert!(!ck.contains("nope"));
        assert_eq!(ck.to_f32("a.f32").unwrap(), vals);
        assert_eq!(ck.to_f32("e.scalar").unwrap(), [7.0]);
        assert_eq!(ck.get("e.scalar").unwrap().numel(), 1);
        // All six values are exact in bf16 and f16.
        assert_eq!(ck.to_f32("b.bf16").unwrap(), vals);
        assert_eq!(ck.to_f32("c.f16").unwrap(), vals);
        assert!(matches!(ck.f32_slice("a.f32").unwrap(), Cow::Borrowed(_)), "aligned F32 is borrowed");
        assert!(matches!(ck.f32_slice("b.bf16").unwrap(), Cow::Owned(_)));
        assert_eq!(err_of(ck.to_f32("d.u8")), "tensor `d.u8`: is U8, not a float tensor (F32, BF16 or F16)");
        let m = ck.meta("b.bf16").unwrap();
        assert_eq!((m.st_dtype, m.nbytes, m.dtype()), (safetensors::Dtype::BF16, 12, Some(DType::BF16)));
        // A directory holding model.safetensors opens the same.
        assert_eq!(Checkpoint::open(&dir.0).unwrap().names(), ck.names());
    }

    #[test]
    fn bf16_and_f16_conversion_is_exact() {
        let dir = TempDir::new("conv");
        let path = dir.join("x.safetensors");
        // Every 16-bit pattern: the conversion must be the exact widening.
        let bits: Vec<u16> = (0..=u16::MAX).collect();
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let tensors =
            vec![raw("bf", DType::BF16, &[bits.len()], bytes.clone()), raw("h", DType::F16, &[bits.len()], bytes)];
        write_safetensors(&path, &tensors, None).unwrap();
        let ck = Checkpoint::open(&path).unwrap();
        let bf = ck.to_f32("bf").unwrap();
        let h = ck.to_f32("h").unwrap();
        for (i, &b) in bits.iter().enumerate() {
            // bf16 is the top half of an f32: widening is a shift (half quiets signalling NaNs).
            let wide = f32::from_bits(u32::from(b) << 16);
            assert!(bf[i].to_bits() == wide.to_bits() || (bf[i].is_nan() && wide.is_nan()), "{b:#x}");
            let want = half::f16::from_bits(b).to_f32();
            assert!(h[i].to_bits() == want.to_bits() || (h[i].is_nan() && want.is_nan()), "{b:#x}");
        }
        assert_eq!(h[0x3c00], 1.0);
        assert_eq!(h[0x0001], 2f32.powi(-24), "smallest f16 subnormal");
    }

    #[test]
    fn sharded_by_dir_and_by_index() {
        let dir = TempDir::new("shard");
        let s1 = "model-00001-of-00002.safetensors";
        let s2 = "model-00002-of-00002.safetensors";
        write_safetensors(&dir.join(s1), &[f32_raw("a", &[2], &[1.0, 2.0]), f32_raw("b", &[1], &[3.0])], None).unwrap();
        write_safetensors(&dir.join(s2), &[bf16_raw("c", &[2, 2], &[4.0, 5.0, 6.0, 7.0])], None).unwrap();
        let index = serde_json::json!({
            "metadata": {"total_size": 28},
            "weight_map": {"a": s1, "b": s1, "c": s2}
        });
        std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
        // A stray single file beside the index must not be picked: the index wins.
        write_safetensors(&dir.join(SINGLE_FILE), &[f32_raw("stray", &[1], &[0.0])], None).unwrap();
        for ck in [Checkpoint::open(&dir.0).unwrap(), Checkpoint::open(dir.join(INDEX_FILE)).unwrap()] {
            assert_eq!(ck.names(), ["a", "b", "c"]);
            assert_eq!(ck.files(), [dir.join(s1), dir.join(s2)]);
            assert_eq!(ck.to_f32("b").unwrap(), [3.0]);
            assert_eq!(ck.to_f32("c").unwrap(), [4.0, 5.0, 6.0, 7.0]);
            assert_eq!(ck.get("c").unwrap().file, dir.join(s2));
        }

        // The index names a tensor its shard does not hold.
        let bad = serde_json::json!({"weight_map": {"a": s1, "b": s1, "c": s2, "d": s2}});
        std::fs::write(dir.join("bad1.json"), bad.to_string()).unwrap();
        let e = err_of(Checkpoint::open(dir.join("bad1.json")));
        assert_eq!(
            e,
            format!(
                "tensor `d`: {} puts it in {}, which does not hold it",
                dir.join("bad1.json").display(),
                dir.join(s2).display()
            )
        );

        // The same tensor in two shards.
        write_safetensors(&dir.join("dup.safetensors"), &[f32_raw("a", &[2], &[1.0, 2.0])], None).unwrap();
        let bad = serde_json::json!({"weight_map": {"a": s1, "b": s1, "x": "dup.safetensors"}});
        std::fs::write(dir.join("bad2.json"), bad.to_string()).unwrap();
        let e = err_of(Checkpoint::open(dir.join("bad2.json")));
        assert_eq!(
            e,
            format!(
                "tensor `a`: stored twice: in {} and in {}",
                dir.join("dup.safetensors").display(),
                dir.join(s1).display()
            )
        );

        // A shard file that does not exist.
        let bad = serde_json::json!({"weight_map": {"a": s1, "z": "model-00003-of-00003.safetensors"}});
        std::fs::write(dir.join("bad3.json"), bad.to_string()).unwrap();
        let e = err_of(Checkpoint::open(dir.join("bad3.json")));
        assert_eq!(
            e,
            format!(
                "{}: shard `model-00003-of-00003.safetensors` (named for 1 tensors, e.g. `z`) does not exist: looked for {}",
                dir.join("bad3.json").display(),
                dir.join("model-00003-of-00003.safetensors").display()
            )
        );

        // A shard path that leaves the directory.
        let bad = serde_json::json!({"weight_map": {"a": "../elsewhere.safetensors"}});
        std::fs::write(dir.join("bad4.json"), bad.to_string()).unwrap();
        assert!(err_of(Checkpoint::open(dir.join("bad4.json"))).contains("relative paths without `..`"));
    }

    #[test]
    fn bnb_4bit_weights_load_as_stored_and_dequantized() {
        let dir = TempDir::new("bnb");
        let path = dir.join("model.safetensors");
        let mut rng = Rng::new(5);
        let name = "model.layers.0.self_attn.q_proj.weight";
        let w: Vec<f32> = (0..(48 * 40)).map(|_| rng.normal() as f32 * 0.02).collect();
        let t = Nf4Tensor::quantize(&w, Shape::new([48, 40]).unwrap(), DType::BF16, true).unwrap();
        let mut tensors = to_bnb_tensors(name, &t).unwrap();
        tensors.push(bf16_raw("model.norm.weight", &[4], &[1.0, 1.0, 0.5, 2.0]));
        write_safetensors(&path, &tensors, None).unwrap();

        let ck = Checkpoint::open(&path).unwrap();
        assert!(ck.is_bnb_4bit(name));
        assert!(!ck.is_bnb_4bit("model.norm.weight"));
        assert_eq!(ck.load_weight(name, LoadAs::Nf4).unwrap(), LoadedWeight::Nf4(t.clone()));
        let dense = ck.load_weight(name, LoadAs::F32).unwrap();
        assert_eq!(dense.shape(), [48, 40]);
        assert_eq!(dense, LoadedWeight::F32 { shape: vec![48, 40], data: t.dequantize().unwrap() });

        // A damaged side tensor is reported through the bnb reader, naming the weight.
        let mut broken: Vec<RawTensor<'_>> =
            tensors.iter().filter(|r| !r.name.ends_with(".nested_absmax")).cloned().collect();
        broken.retain(|r| r.name != "model.norm.weight");
        write_safetensors(&dir.join("broken.safetensors"), &broken, None).unwrap();
        let ck = Checkpoint::open(dir.join("broken.safetensors")).unwrap();
        assert_eq!(
            err_of(ck.load_weight(name, LoadAs::Nf4)),
            format!("bitsandbytes 4-bit `{name}`: missing tensor `{name}.nested_absmax`")
        );
    }

    #[test]
    fn dense_weights_quantize_like_the_reference() {
        let dir = TempDir::new("dense");
        let path = dir.join("w.safetensors");
        let mut rng = Rng::new(11);
        let v: Vec<f32> = (0..(33 * 70)).map(|_| rng.normal() as f32).collect();
        // Round to bf16 first so the file holds exactly these values.
        let v: Vec<f32> = v.iter().map(|x| half::bf16::from_f32(*x).to_f32()).collect();
        write_safetensors(&path, &[bf16_raw("w", &[33, 70], &v), raw("u", DType::U8, &[4], vec![1, 2, 3, 4])], None)
            .unwrap();
        let ck = Checkpoint::open(&path).unwrap();
        let want = Nf4Tensor::quantize(&v, Shape::new([33, 70]).unwrap(), DType::BF16, true).unwrap();
        assert_eq!(ck.load_weight("w", LoadAs::Nf4).unwrap(), LoadedWeight::Nf4(want));
        assert_eq!(ck.load_weight("w", LoadAs::F32).unwrap(), LoadedWeight::F32 { shape: vec![33, 70], data: v });
        assert_eq!(
            err_of(ck.load_weight("u", LoadAs::F32)),
            "tensor `u`: is U8 but has no bitsandbytes quant state (`u.quant_state.bitsandbytes__nf4`); \
             a weight must be F32, BF16, F16 or bitsandbytes 4-bit"
        );
    }

    #[test]
    fn missing_tensor_suggests_a_close_name() {
        let dir = TempDir::new("miss");
        let path = dir.join("m.safetensors");
        let names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight"];
        let tensors: Vec<_> = names.iter().map(|n| f32_raw(n, &[1], &[0.0])).collect();
        write_safetensors(&path, &tensors, None).unwrap();
        let ck = Checkpoint::open(&path).unwrap();
        let p = path.display();
        assert_eq!(
            err_of(ck.get("model.layers.0.mlp.upproj.weight")),
            format!(
                "tensor `model.layers.0.mlp.upproj.weight`: not found in {p} (did you mean `model.layers.0.mlp.up_proj.weight`?)"
            )
        );
        assert_eq!(
            err_of(ck.get("embed_tokens.weight")),
            format!("tensor `embed_tokens.weight`: not found in {p} (did you mean `model.embed_tokens.weight`?)")
        );
        assert_eq!(err_of(ck.get("lm_head.weight")), format!("tensor `lm_head.weight`: not found in {p}"));
        assert_eq!(
            err_of(ck.load_weight("lm_head.weight", LoadAs::F32)),
            format!("tensor `lm_head.weight`: not found in {p}")
        );
    }

    #[test]
    fn odd_dtypes_open_but_refuse_to_read() {
        let dir = TempDir::new("odd");
        let path = dir.join("odd.safetensors");
        let header = r#"{"__metadata__":{"format":"pt"},"step":{"dtype":"I64","shape":[],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
        let mut data = 42i64.to_le_bytes().to_vec();
        data.extend_from_slice(&1.5f32.to_le_bytes());
        handmade(&path, header, &data);
        let ck = Checkpoint::open(&path).unwrap();
        assert_eq!(ck.to_f32("w").unwrap(), [1.5]);
        // The F32 data sits at an offset of 8 + header + 8: not necessarily aligned, still read.
        assert_eq!(
            err_of(ck.get("step")),
            "tensor `step`: dtype I64 is not supported (gristmill reads F32, BF16, F16 and U8)"
        );
        assert_eq!(ck.meta("step").unwrap().dtype(), None);
        use gristmill_core::bnb::TensorSource;
        assert!(ck.tensor("step").is_none());
        assert!(ck.tensor("w").is_some());
    }

    #[test]
    fn unaligned_f32_is_copied() {
        let dir = TempDir::new("unal");
        let path = dir.join("u.safetensors");
        // Header of 9 bytes after the 8-byte length: the data starts at byte 17 of the file.
        let header = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let header = format!("{header}{}", " ".repeat((4 - (8 + header.len()) % 4) % 4 + 1));
        let data: Vec<u8> = [0.5f32, -1.25].iter().flat_map(|x| x.to_le_bytes()).collect();
        handmade(&path, &header, &data);
        let ck = Checkpoint::open(&path).unwrap();
        let s = ck.f32_slice("w").unwrap();
        assert!(matches!(s, Cow::Owned(_)));
        assert_eq!(&*s, [0.5, -1.25]);
    }

    #[test]
    fn damaged_files_give_clear_errors() {
        let dir = TempDir::new("bad");
        let good = dir.join("good.safetensors");
        write_safetensors(&good, &[f32_raw("a", &[4], &[1.0, 2.0, 3.0, 4.0]), f32_raw("b", &[2], &[5.0, 6.0])], None)
            .unwrap();
        let bytes = std::fs::read(&good).unwrap();
        let open_err = |name: &str, b: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, b).unwrap();
            (err_of(Checkpoint::open(&p)), p.display().to_string())
        };

        // Truncated in the middle of the data: the last tensor runs past the end.
        let (e, p) = open_err("trunc.safetensors", &bytes[..bytes.len() - 5]);
        assert_eq!(
            e,
            format!(
                "{p}: tensor `b`: data_offsets [16, 24] point past the end of the data (19 bytes follow the header): \
                 the file is truncated or its header is wrong"
            )
        );

        // Truncated inside the header.
        let (e, p) = open_err("trunc_header.safetensors", &bytes[..20]);
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        assert_eq!(
            e,
            format!(
                "{p}: header length field says {n} bytes but only 12 follow it: truncated inside the header, or not a safetensors file"
            )
        );

        // Offsets past the end of a file that is otherwise consistent.
        let p = dir.join("past.safetensors");
        handmade(&p, r#"{"x":{"dtype":"F32","shape":[16],"data_offsets":[0,64]}}"#, &[0u8; 16]);
        assert_eq!(
            err_of(Checkpoint::open(&p)),
            format!(
                "{}: tensor `x`: data_offsets [0, 64] point past the end of the data (16 bytes follow the header): \
                 the file is truncated or its header is wrong",
                p.display()
            )
        );

        // A header length field of 2^60.
        let mut huge = (1u64 << 60).to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        let (e, p) = open_err("huge.safetensors", &huge);
        assert_eq!(
            e,
            format!(
                "{p}: header length field says 1152921504606846976 bytes, over the safetensors limit of 100000000: \
                 not a safetensors file, or a damaged one"
            )
        );

        // A byte count that does not match dtype × shape.
        let p = dir.join("size.safetensors");
        handmade(&p, r#"{"x":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#, &[0u8; 20]);
        assert_eq!(
            err_of(Checkpoint::open(&p)),
            format!("{}: tensor `x`: F32 × [2, 3] needs 24 bytes but its data_offsets [0, 20] span 20", p.display())
        );

        // Overlapping tensors.
        let p = dir.join("overlap.safetensors");
        handmade(
            &p,
            r#"{"x":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"y":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
            &[0u8; 6],
        );
        assert!(
            err_of(Checkpoint::open(&p))
                .contains("tensor `y`: data_offsets [2, 6] start at 2 but the previous tensor ends at 4")
        );

        // Trailing bytes after the last tensor.
        let mut long = bytes.clone();
        long.extend_from_slice(&[0; 3]);
        let (e, p) = open_err("long.safetensors", &long);
        assert_eq!(
            e,
            format!("{p}: the tensors end at byte 24 of the data but 27 bytes follow the header: trailing bytes")
        );

        // Not JSON, too short, empty, missing.
        let mut junk = 4u64.to_le_bytes().to_vec();
        junk.extend_from_slice(b"nope");
        let (e, _) = open_err("junk.safetensors", &junk);
        assert!(e.contains("header is not a valid safetensors JSON header"), "{e}");
        let (e, p) = open_err("short.safetensors", &[1, 2, 3]);
        assert_eq!(e, format!("{p}: 3 bytes is too short for a safetensors file (8-byte header length)"));
        let (e, p) = open_err("empty.safetensors", &[]);
        assert_eq!(e, format!("{p}: 0 bytes is too short for a safetensors file (8-byte header length)"));
        let p = dir.join("absent.safetensors");
        assert!(err_of(Checkpoint::open(&p)).starts_with(&format!("{}: ", p.display())));

        // A directory with nothing to open.
        let empty = TempDir::new("emptydir");
        assert_eq!(
            err_of(Checkpoint::open(&empty.0)),
            format!(
                "{}: no model.safetensors, model.safetensors.index.json or other .safetensors file in this directory",
                empty.0.display()
            )
        );
    }

    #[test]
    fn fuzzed_headers_never_panic() {
        let dir = TempDir::new("fuzz");
        let good = dir.join("g.safetensors");
        write_safetensors(&good, &[f32_raw("a", &[3], &[1.0, 2.0, 3.0]), bf16_raw("b", &[2], &[1.0, 2.0])], None)
            .unwrap();
        let bytes = std::fs::read(&good).unwrap();
        let mut rng = Rng::new(3);
        let p = dir.join("f.safetensors");
        for i in 0..300 {
            let mut b = bytes.clone();
            // Flip a few bytes, or cut the file short.
            if i % 3 == 0 {
                b.truncate((rng.next_u64() as usize) % b.len());
            } else {
                for _ in 0..1 + i % 4 {
                    let at = (rng.next_u64() as usize) % b.len();
                    b[at] = rng.next_u64() as u8;
                }
            }
            std::fs::write(&p, &b).unwrap();
            if let Ok(ck) = Checkpoint::open(&p) {
                for n in ck.names() {
                    let _ = ck.to_f32(n);
                    let _ = ck.load_weight(n, LoadAs::Nf4);
                }
            }
        }
    }

    /// Writes `tensors` with the stream writer, in the order it asks for.
    fn stream_write(path: &Path, tensors: &[RawTensor<'_>], meta: Option<HashMap<String, String>>) -> Result<u64> {
        let specs = tensors.iter().map(|t| (t.name.clone(), t.dtype, t.shape.clone())).collect();
        let mut w = SafetensorsStreamWriter::create(path, specs, meta)?;
        let order: Vec<String> = w.names().map(str::to_owned).collect();
        for name in &order {
            assert_eq!(w.next_name(), Some(name.as_str()));
            let t = tensors.iter().find(|t| &t.name == name).unwrap();
            w.write_tensor(name, &t.data)?;
        }
        assert_eq!(w.next_name(), None);
        w.finish()
    }

    #[test]
    fn stream_writer_matches_write_safetensors() {
        let dir = TempDir::new("stream");
        let mut rng = Rng::new(5);
        let mut vals = |n: usize| (0..n).map(|_| rng.normal() as f32).collect::<Vec<f32>>();
        let f16_raw = |name: &str, shape: &[usize], v: &[f32]| {
            raw(name, DType::F16, shape, v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect())
        };
        let mixed = vec![
            bf16_raw("b.weight", &[3, 5], &vals(15)),
            f32_raw("a.norm", &[7], &vals(7)),
            raw("codes", DType::U8, &[2, 3], vec![1, 2, 3, 4, 5, 6]),
            f16_raw("h", &[2, 2], &vals(4)),
            f32_raw("scalar", &[], &[2.5]),
            // Zero-size tensors, of several dtypes and between others.
            f32_raw("empty.f32", &[0], &[]),
            bf16_raw("empty.bf16", &[4, 0, 3], &[]),
            raw("empty.u8", DType::U8, &[0], vec![]),
        ];
        let many: Vec<RawTensor<'static>> = (0..300)
            .map(|i| {
                let shape = [1 + i % 7, (i * 13) % 5];
                let n = shape[0] * shape[1];
                if i % 3 == 0 {
                    f32_raw(&format!("model.layers.{i}.w"), &shape, &vals(n))
                } else {
                    bf16_raw(&format!("model.layers.{i}.w"), &shape, &vals(n))
                }
            })
            .collect();
        let one_key = HashMap::from([("format".to_string(), "pt".to_string())]);
        let two_keys = HashMap::from([("format".to_string(), "pt".to_string()), ("step".into(), "12".into())]);
        type Case<'a> = (&'a str, &'a [RawTensor<'a>], Option<HashMap<String, String>>);
        let cases: [Case<'_>; 6] = [
            ("mixed", &mixed, None),
            ("mixed_meta", &mixed, Some(one_key.clone())),
            ("mixed_meta2", &mixed, Some(two_keys)),
            ("many", &many, Some(one_key.clone())),
            ("nothing", &[], None),
            ("nothing_meta", &[], Some(one_key)),
        ];
        for (tag, tensors, meta) in cases {
            let a = dir.join(&format!("{tag}_a.safetensors"));
            let b = dir.join(&format!("{tag}_b.safetensors"));
            // A clone of the same map iterates in the same order, so both headers list the
            // metadata keys alike.
            write_safetensors(&a, tensors, meta.clone()).unwrap();
            let size = stream_write(&b, tensors, meta.clone()).unwrap();
            let (ab, bb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
            assert_eq!(size, bb.len() as u64, "{tag}");
            assert!(ab == bb, "{tag}: the two writers differ");
            assert!(!crate::util::tmp_path(&b).exists(), "{tag}");

            // Both readers see every tensor, with its bytes, and the metadata.
            let st = safetensors::SafeTensors::deserialize(&bb).unwrap();
            assert_eq!(st.len(), tensors.len(), "{tag}");
            let (_, header) = safetensors::SafeTensors::read_metadata(&bb).unwrap();
            assert_eq!(header.metadata(), &meta, "{tag}");
            let ck = Checkpoint::open(&b).unwrap();
            assert_eq!(ck.len(), tensors.len(), "{tag}");
            for t in tensors {
                let v = st.tensor(&t.name).unwrap();
                assert_eq!((v.dtype(), v.shape(), v.data()), (st_dtype(t.dtype), &t.shape[..], &t.data[..]), "{tag}");
                let r = ck.get(&t.name).unwrap();
                assert_eq!((r.dtype, r.shape, r.data), (t.dtype, &t.shape[..], &t.data[..]), "{tag}");
            }
        }
    }

    #[test]
    fn stream_writer_refuses_bad_writes_and_leaves_no_file() {
        let dir = TempDir::new("stream_bad");
        let path = dir.join("model.safetensors");
        let tmp = crate::util::tmp_path(&path);
        let specs = || {
            vec![
                ("b".to_string(), DType::F32, vec![2]),
                ("a".to_string(), DType::F32, vec![1]),
                ("c".to_string(), DType::BF16, vec![3]),
            ]
        };
        let (a, b, c) = ([0u8; 4], [0u8; 8], [0u8; 6]);
        assert_eq!(
            SafetensorsStreamWriter::create(&path, specs(), None).unwrap().names().collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        // Each case: the writes, then `finish` when they all succeeded; the error expected.
        type Step<'a> = (&'a str, &'a [u8]);
        let cases: [(&[Step<'_>], String); 6] = [
            (&[("b", &b)], "tensor `b`: written out of order: `a` comes first in the header".into()),
            (&[("a", &b)], "tensor `a`: 8 bytes of data, but the header says 4".into()),
            (&[("a", &a), ("a", &a)], "tensor `a`: written twice".into()),
            (&[("a", &a), ("b", &b), ("c", &c), ("c", &c)], "tensor `c`: written twice".into()),
            (&[("a", &a), ("zz", &a)], format!("tensor `zz`: not in the header of {}", path.display())),
            (
                &[("a", &a), ("b", &b)],
                format!("tensor `c`: never written (1 of 3 tensors missing from {})", path.display()),
            ),
        ];
        for (steps, want) in cases {
            let mut w = SafetensorsStreamWriter::create(&path, specs(), None).unwrap();
            assert!(tmp.exists());
            let mut err = None;
            for (name, data) in steps {
                if let Err(e) = w.write_tensor(name, data) {
                    err = Some(e.to_string());
                    // Nothing is accepted after a failure, not even the right tensor.
                    assert!(w.write_tensor("a", &a).is_err());
                    break;
                }
            }
            let err = match err {
                Some(e) => {
                    assert!(w.finish().is_err());
                    e
                }
                None => err_of(w.finish()),
            };
            assert_eq!(err, want);
            assert!(!path.exists(), "{want}");
            assert!(!tmp.exists(), "{want}");
        }

        // An abandoned writer leaves nothing, and does not touch an existing file.
        std::fs::write(&path, b"old").unwrap();
        let mut w = SafetensorsStreamWriter::create(&path, specs(), None).unwrap();
        w.write_tensor("a", &a).unwrap();
        drop(w);
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert!(!tmp.exists());
        std::fs::remove_file(&path).unwrap();

        // A name listed twice is refused before anything is written.
        let mut dup = specs();
        dup.push(("a".into(), DType::U8, vec![1]));
        assert_eq!(
            err_of(SafetensorsStreamWriter::create(&path, dup, None)),
            format!("tensor `a`: listed twice for {}", path.display())
        );
        assert!(!path.exists() && !tmp.exists());

        // A finished writer's file replaces the old one.
        std::fs::write(&path, b"old").unwrap();
        let mut w = SafetensorsStreamWriter::create(&path, specs(), None).unwrap();
        for (n, d) in [("a", &a[..]), ("b", &b), ("c", &c)] {
            w.write_tensor(n, d).unwrap();
        }
        w.finish().unwrap();
        assert_eq!(Checkpoint::open(&path).unwrap().names(), ["a", "b", "c"]);
        assert!(!tmp.exists());
    }

    #[test]
    fn directory_with_one_adapter_file() {
        let dir = TempDir::new("adapter");
        write_safetensors(&dir.join("adapter_model.safetensors"), &[f32_raw("x", &[1], &[2.0])], None).unwrap();
        // Our writer's temporary files are not candidates.
        std::fs::write(dir.join(".other.safetensors.tmp"), b"junk").unwrap();
        assert_eq!(Checkpoint::open(&dir.0).unwrap().to_f32("x").unwrap(), [2.0]);
        write_safetensors(&dir.join("second.safetensors"), &[f32_raw("y", &[1], &[2.0])], None).unwrap();
        assert!(err_of(Checkpoint::open(&dir.0)).contains("holds several candidates"));
    }
}
