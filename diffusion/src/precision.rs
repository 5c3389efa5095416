//! The floating-point precision a pipeline holds its weights and computes in.

use candle_core::DType;

/// The precision of a pipeline's weights and of the networks' arithmetic.
///
/// The samplers' latents stay f32 either way (they are cast on the way into and
/// out of the UNet), as ComfyUI keeps them: the schedule's small differences
/// between steps would lose bits in f16. Noise is always made in f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// 32-bit floats: the default, and the fast dtype on CPUs.
    #[default]
    F32,
    /// 16-bit floats: half the memory; fast on GPUs, about 2.5× slower on CPUs.
    F16,
}

impl Precision {
    /// Every precision, in the order `--dtype` lists them.
    pub const ALL: [Precision; 2] = [Precision::F32, Precision::F16];

    /// Returns candle's dtype.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
        }
    }

    /// Returns the name used by `--dtype` and in determinism classes: `f32` or `f16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A precision name other than `f32` or `f16`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the dtype must be f32 or f16, got {0:?}")]
pub struct ParsePrecisionError(pub String);

impl std::str::FromStr for Precision {
    type Err = ParsePrecisionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Precision::ALL
            .into_iter()
            .find(|p| p.name() == s.trim())
            .ok_or_else(|| ParsePrecisionError(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in Precision::ALL {
            assert_eq!(p.name().parse::<Precision>(), Ok(p));
        }
        assert!("bf16".parse::<Precision>().is_err());
        assert_eq!(Precision::default(), Precision::F32);
    }
}
