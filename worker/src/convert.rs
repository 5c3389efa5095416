//! The worker's edge: conversions between its own types and the WorkerLink
//! wire messages. Renderers and the render thread never see `pb`.

use kiln_proto::pb;

use crate::render::{Assets, ModelInfo, RenderError, RenderTask};

/// Returns a model as the worker announces it on registration.
pub fn model_info(m: ModelInfo) -> pb::ModelInfo {
    pb::ModelInfo {
        name: m.name,
        hash: m.hash,
    }
}

/// Returns the assets of a renderer as the three lists it announces on
/// registration: LoRAs, embeddings and ControlNets, each by name with its hash.
pub fn asset_infos(assets: &Assets) -> [Vec<pb::ModelInfo>; 3] {
    let list = |files: &std::collections::BTreeMap<String, kiln_diffusion::AssetFile>| {
        files
            .values()
            .map(|f| pb::ModelInfo {
                name: f.name.clone(),
                hash: f.hash.clone(),
            })
            .collect()
    };
    [
        list(&assets.loras),
        list(&assets.embeddings),
        list(&assets.controlnets),
    ]
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

/// Builds the render task of a lease: its recipe and the blobs it refers to.
pub fn render_task(task: &pb::LeasedTask) -> Result<RenderTask, RenderError> {
    let recipe = task
        .recipe
        .as_ref()
        .ok_or_else(|| RenderError::BadInput("the lease has no recipe".into()))
        .and_then(|r| {
            kiln_proto::convert::recipe_from_pb(r, "recipe")
                .map_err(|e| RenderError::BadInput(e.to_string()))
        })?;
    let blob = |sha: &Option<String>| -> Result<Option<Vec<u8>>, RenderError> {
        let Some(sha) = sha else { return Ok(None) };
        task.blobs
            .iter()
            .find(|b| &b.sha256 == sha)
            .map(|b| Some(b.data.clone()))
            .ok_or_else(|| {
                RenderError::Internal(format!("the lease did not carry the image {sha}"))
            })
    };
    let controls = recipe
        .extras
        .controlnets
        .iter()
        .map(|c| blob(&Some(c.image.clone())).map(Option::unwrap_or_default))
        .collect::<Result<_, _>>()?;
    Ok(RenderTask {
        init_image: blob(&recipe.init_image)?,
        mask: blob(&recipe.mask)?,
        controls,
        recipe,
        span: tracing::Span::none(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_render_error_has_its_fault_class() {
        assert_eq!(
            fault(&RenderError::BadInput("x".into())),
            pb::FaultClass::BadInput
        );
        assert_eq!(
            fault(&RenderError::OutOfMemory("x".into())),
            pb::FaultClass::OutOfMemory
        );
        assert_eq!(fault(&RenderError::Cancelled), pb::FaultClass::Cancelled);
        let model = RenderError::Model {
            model: "tiny".into(),
            message: "gone".into(),
        };
        assert_eq!(fault(&model), pb::FaultClass::ModelLoad);
        assert_eq!(
            fault(&RenderError::Internal("x".into())),
            pb::FaultClass::Internal
        );
    }

    #[test]
    fn a_lease_without_its_recipe_or_image_is_refused() {
        let none = pb::LeasedTask::default();
        assert!(matches!(render_task(&none), Err(RenderError::BadInput(_))));
        let recipe = pb::Recipe {
            model: "tiny".into(),
            prompt: "a fox".into(),
            seed: 1,
            steps: 4,
            guidance: 5.0,
            width: 64,
            height: 64,
            scheduler: "ddim".into(),
            strength: 0.5,
            init_image: "ab".repeat(32),
            ..Default::default()
        };
        let lease = pb::LeasedTask {
            recipe: Some(recipe),
            ..Default::default()
        };
        let e = render_task(&lease).expect_err("the init image was not sent");
        assert!(e.to_string().contains(&"ab".repeat(32)), "{e}");
    }
}
