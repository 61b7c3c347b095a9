//! [`Real`]: the float types the reference ops are written over.
//!
//! The library computes in f32 (f32 accumulation, as the GPU kernels do); tests instantiate the
//! same code in f64 so that a central finite difference is accurate enough to check a backward
//! pass to many digits. Transcendentals come from libm so the core stays `no_std`.

use core::fmt::{Debug, Display};
use core::iter::Sum;
use core::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

/// A real scalar: f32 or f64.
pub trait Real:
    Copy
    + Default
    + Debug
    + Display
    + PartialEq
    + PartialOrd
    + Send
    + Sync
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    /// Machine epsilon.
    const EPSILON: Self;
    /// Converts from f64, rounding to nearest.
    fn from_f64(v: f64) -> Self;
    /// Converts from f32 exactly.
    fn from_f32(v: f32) -> Self;
    fn to_f64(self) -> f64;
    /// Converts to f32, rounding to nearest.
    fn to_f32(self) -> f32;
    #[inline]
    fn from_usize(v: usize) -> Self {
        Self::from_f64(v as f64)
    }
    fn sqrt(self) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sin(self) -> Self;
    fn cos(self) -> Self;
    fn tanh(self) -> Self;
    fn powf(self, e: Self) -> Self;
    fn abs(self) -> Self;
    fn is_finite(self) -> bool;
    /// The larger of two values; NaN propagates from `self`.
    #[inline]
    fn max(self, other: Self) -> Self {
        if other > self { other } else { self }
    }
    /// The smaller of two values; NaN propagates from `self`.
    #[inline]
    fn min(self, other: Self) -> Self {
        if other < self { other } else { self }
    }
    /// Logistic sigmoid 1 / (1 + e^-x), stable for large |x|.
    #[inline]
    fn sigmoid(self) -> Self {
        if self >= Self::ZERO {
            Self::ONE / (Self::ONE + (-self).exp())
        } else {
            let e = self.exp();
            e / (Self::ONE + e)
        }
    }
}

macro_rules! impl_real {
    ($t:ty, $sqrt:path, $exp:path, $ln:path, $sin:path, $cos:path, $tanh:path, $pow:path, $abs:path) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const EPSILON: Self = <$t>::EPSILON;
            #[inline]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline]
            fn from_f32(v: f32) -> Self {
                v as $t
            }
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline]
            fn to_f32(self) -> f32 {
                self as f32
            }
            #[inline]
            fn sqrt(self) -> Self {
                $sqrt(self)
            }
            #[inline]
            fn exp(self) -> Self {
                $exp(self)
            }
            #[inline]
            fn ln(self) -> Self {
                $ln(self)
            }
            #[inline]
            fn sin(self) -> Self {
                $sin(self)
            }
            #[inline]
            fn cos(self) -> Self {
                $cos(self)
            }
            #[inline]
            fn tanh(self) -> Self {
                $tanh(self)
            }
            #[inline]
            fn powf(self, e: Self) -> Self {
                $pow(self, e)
            }
            #[inline]
            fn abs(self) -> Self {
                $abs(self)
            }
            #[inline]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
        }
    };
}

impl_real!(f32, libm::sqrtf, libm::expf, libm::logf, libm::sinf, libm::cosf, libm::tanhf, libm::powf, libm::fabsf);
impl_real!(f64, libm::sqrt, libm::exp, libm::log, libm::sin, libm::cos, libm::tanh, libm::pow, libm::fabs);
