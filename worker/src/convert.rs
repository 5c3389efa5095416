//! The worker's edge: conversions between its own types and the WorkerLink
//! wire messages. Renderers and the render thread never see `pb`.

use kiln_proto::pb;

use crate::render::{ModelInfo, RenderError};

/// Returns a model as the worker announces it on registration.
pub fn model_info(m: ModelInfo) -> pb::ModelInfo {
    pb::ModelInfo {
        name: m.name,
        hash: m.hash,
    }
}

/// Returns the fault class a render error is reported under, which decides
/// whether the coordinator retries the task elsewhere.
pub fn fault(e: &RenderError) -> pb::FaultClass {
    match e {
        RenderError::Cancelled => pb::FaultClass::Cancelled,
        RenderError::BadInput(_) => pb::FaultClass::BadInput,
        RenderError::Model { .. } => pb::FaultClass::ModelLoad,
        RenderError::OutOfMemory(_) => pb::FaultClass::OutOfMemory,
        RenderError::Internal(_) => pb::FaultClass::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bad_input_is_reported_as_bad_input() {
        assert_eq!(
            fault(&RenderError::BadInput("x".into())),
            pb::FaultClass::BadInput
        );
        assert_eq!(
            fault(&RenderError::OutOfMemory("x".into())),
            pb::FaultClass::OutOfMemory
        );
        assert_eq!(fault(&RenderError::Cancelled), pb::FaultClass::Cancelled);
        assert_eq!(
            fault(&RenderError::Internal("x".into())),
            pb::FaultClass::Internal
        );
    }
}
