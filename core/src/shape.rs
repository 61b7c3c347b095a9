//! Shapes with checked arithmetic: a header field can never make us allocate a wrapped size.

use crate::error::{Error, Result, checked_product};
use alloc::vec::Vec;

/// Dimensions of a row-major tensor, outermost first.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(Vec<usize>);

impl Shape {
    /// A shape from its dimensions; fails if the element count overflows `usize`.
    pub fn new(dims: impl Into<Vec<usize>>) -> Result<Self> {
        let dims = dims.into();
        checked_product(&dims)?;
        Ok(Self(dims))
    }

    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// Number of elements (1 for a scalar). Never overflows: checked at construction.
    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }

    /// Dimension `i`, counting from the end when negative (`-1` is the last).
    pub fn dim(&self, i: isize) -> Result<usize> {
        let r = self.rank() as isize;
        let j = if i < 0 { r + i } else { i };
        if (0..r).contains(&j) {
            Ok(self.0[j as usize])
        } else {
            Err(crate::error::invalid("Shape::dim", "index", alloc::format!("{i} for rank {r}")))
        }
    }

    /// Row-major strides in elements.
    pub fn strides(&self) -> Vec<usize> {
        let mut s = alloc::vec![1usize; self.rank()];
        for i in (0..self.rank().saturating_sub(1)).rev() {
            s[i] = s[i + 1] * self.0[i + 1];
        }
        s
    }

    /// Splits into (product of leading dims, last dim): the (M, K) view a matrix op sees.
    pub fn as_matrix(&self) -> Result<(usize, usize)> {
        match self.0.split_last() {
            Some((&k, lead)) => Ok((lead.iter().product(), k)),
            None => Err(crate::error::invalid("Shape::as_matrix", "rank", "a scalar has no rows")),
        }
    }

    /// Same elements, new dimensions.
    pub fn reshape(&self, dims: impl Into<Vec<usize>>) -> Result<Self> {
        let new = Self::new(dims)?;
        if new.numel() != self.numel() {
            return Err(Error::Shape {
                op: "reshape",
                what: "element count",
                expected: self.numel(),
                found: new.numel(),
            });
        }
        Ok(new)
    }
}

impl core::fmt::Display for Shape {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "(")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, ")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_and_consistent() {
        let s = Shape::new([2, 3, 4]).unwrap();
        assert_eq!(s.numel(), 24);
        assert_eq!(s.strides(), [12, 4, 1]);
        assert_eq!(s.as_matrix().unwrap(), (6, 4));
        assert_eq!(s.dim(-1).unwrap(), 4);
        assert!(s.dim(3).is_err());
        assert_eq!(alloc::format!("{s}"), "(2, 3, 4)");
        assert!(Shape::new([usize::MAX, 2]).is_err());
        assert!(s.reshape([4, 6]).is_ok());
        assert!(s.reshape([5, 5]).is_err());
        assert_eq!(Shape::new([]).unwrap().numel(), 1);
    }
}
