//! The operands of kiln's CPU operations: candle hands a custom operation
//! (`CustomOp1`/`2`/`3`) each input as its storage and layout, and every kernel
//! here reads contiguous f32 values. [`contiguous_f32`] is that one check.

use candle_core::{CpuStorage, Layout};

/// The f32 values `layout` addresses in `storage`, when they are contiguous;
/// otherwise an error naming the operation `op`.
pub(crate) fn contiguous_f32<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(values), Some((start, end))) => values.get(start..end).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{op}: the layout addresses {start}..{end} of {} values",
                values.len()
            ))
        }),
        (CpuStorage::F32(_), None) => Err(candle_core::Error::Msg(format!(
            "{op}: contiguous operands expected"
        ))),
        _ => Err(candle_core::Error::Msg(format!(
            "{op}: f32 operands expected"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::contiguous_f32;

    /// What `contiguous_f32` answers for `t`'s storage and layout.
    fn check(op: &str, t: &Tensor) -> candle_core::Result<Vec<f32>> {
        let (storage, layout) = t.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(cpu) => contiguous_f32(op, cpu, layout).map(<[f32]>::to_vec),
            _ => Err(candle_core::Error::Msg("a CPU tensor expected".into())),
        }
    }

    #[test]
    fn gives_the_values_of_a_contiguous_f32_tensor_only() -> candle_core::Result<()> {
        let t = Tensor::arange(0f32, 6., &Device::Cpu)?.reshape((2, 3))?;
        assert_eq!(check("op", &t.narrow(0, 1, 1)?)?, [3f32, 4., 5.]);
        let err = check("kiln-x", &t.t()?).unwrap_err().to_string();
        assert!(err.contains("kiln-x: contiguous"), "{err}");
        let err = check("kiln-x", &Tensor::arange(0u32, 3, &Device::Cpu)?)
            .unwrap_err()
            .to_string();
        assert!(err.contains("kiln-x: f32"), "{err}");
        Ok(())
    }
}
