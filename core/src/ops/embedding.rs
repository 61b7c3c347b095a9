//! Token embedding lookup and its scatter-add backward.

use crate::error::{check_len, checked_product, invalid};
use crate::{Real, Result};
use alloc::vec::Vec;

/// Fails with the first id outside the vocabulary, naming its position: a bad token id is a data
/// bug the user must be able to find in their batch.
fn check_ids(op: &'static str, ids: &[u32], v: usize) -> Result<()> {
    match ids.iter().position(|&id| id as usize >= v) {
        None => Ok(()),
        Some(p) => Err(invalid(
            op,
            "ids",
            alloc::format!("ids[{p}] = {} is out of range for a vocabulary of size {v}", ids[p]),
        )),
    }
}

/// y[m] = table[ids[m]].
///
/// ids: (M)
/// table: (V, C)
/// returns y: (M, C)
pub fn embedding_fwd_ref<T: Real>(ids: &[u32], table: &[T], v: usize, c: usize) -> Result<Vec<T>> {
    const OP: &str = "embedding_fwd_ref";
    check_len(OP, "table", table.len(), checked_product(&[v, c])?)?;
    check_ids(OP, ids, v)?;
    let mut y = Vec::with_capacity(checked_product(&[ids.len(), c])?);
    for &id in ids {
        let row = id as usize * c;
        y.extend_from_slice(&table[row..row + c]);
    }
    Ok(y)
}

/// Gradient of the table: rows of `dy` scatter-added to the rows their ids selected, so a token
/// that occurs several times accumulates (in position order) every occurrence's gradient.
///
/// ids: (M)
/// dy: (M, C)
/// returns dtable: (V, C); rows of ids that do not occur are zero
pub fn embedding_bwd_ref<T: Real>(ids: &[u32], dy: &[T], v: usize, c: usize) -> Result<Vec<T>> {
    const OP: &str = "embedding_bwd_ref";
    check_len(OP, "dy", dy.len(), checked_product(&[ids.len(), c])?)?;
    check_ids(OP, ids, v)?;
    let mut dtable = alloc::vec![T::ZERO; checked_product(&[v, c])?];
    if c == 0 {
        return Ok(dtable);
    }
    for (&id, g) in ids.iter().zip(dy.chunks_exact(c)) {
        let row = id as usize * c;
        for (d, &gi) in dtable[row..row + c].iter_mut().zip(g) {
            *d += gi;
        }
    }
    Ok(dtable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use crate::rng::Rng;
    use crate::testutil::{assert_close, dot, numeric_grad, randn};

    #[test]
    fn hand_computed_lookup_and_scatter() {
        // table rows: 0 -> [0, 1], 1 -> [10, 11], 2 -> [20, 21]; ids [2, 0, 2]
        let table = [0.0f32, 1.0, 10.0, 11.0, 20.0, 21.0];
        let y = embedding_fwd_ref(&[2, 0, 2], &table, 3, 2).unwrap();
        assert_eq!(y, [20.0, 21.0, 0.0, 1.0, 20.0, 21.0]);
        // dy rows [1, 2], [3, 4], [5, 6]: row 2 gets [1 + 5, 2 + 6] = [6, 8], row 0 gets [3, 4],
        // row 1 is never looked up and stays 0.
        let d = embedding_bwd_ref(&[2, 0, 2], &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2).unwrap();
        assert_eq!(d, [3.0, 4.0, 0.0, 0.0, 6.0, 8.0]);
    }

    #[test]
    fn backward_matches_finite_difference() {
        let mut rng = Rng::new(21);
        for (m, v, c) in [(1, 1, 1), (3, 5, 7), (7, 3, 5), (13, 7, 3)] {
            // Fewer ids than rows or more ids than rows: repeats and untouched rows both occur.
            let ids: Vec<u32> = (0..m).map(|_| rng.below(v as u64) as u32).collect();
            let table = randn(&mut rng, v * c, 1.0);
            let w = randn(&mut rng, m * c, 1.0);
            let d = embedding_bwd_ref(&ids, &w, v, c).unwrap();
            let nd = numeric_grad(&table, 1e-6, |t| dot(&embedding_fwd_ref(&ids, t, v, c).unwrap(), &w));
            assert_close("dtable", &d, &nd, 1e-7);
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let t = [0.0f64; 6];
        assert!(matches!(embedding_fwd_ref(&[0], &t[..5], 3, 2), Err(Error::Shape { .. })));
        assert!(matches!(embedding_bwd_ref(&[0, 1], &t[..3], 3, 2), Err(Error::Shape { .. })));
        let e = embedding_fwd_ref(&[0, 1, 3], &t, 3, 2).unwrap_err();
        let msg = alloc::format!("{e}");
        assert!(msg.contains("ids[2]") && msg.contains('3'), "{msg}");
        assert!(matches!(embedding_bwd_ref(&[7], &t[..2], 3, 2), Err(Error::Invalid { .. })));
    }
}
