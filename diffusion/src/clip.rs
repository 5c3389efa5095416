//! kiln's CLIP text transformer: the text encoders of SD 1.x, SD 2.x and SDXL.
//!
//! candle's `clip::text_model` implements QuickGELU only and a fixed layer-norm
//! epsilon, and its Stable Diffusion variant keeps its config private; SD 2.x,
//! SD-Turbo and SDXL's second encoder (OpenCLIP) use exact GELU, and SDXL reads
//! the penultimate layer and a projected pooled output. So kiln owns this small
//! model. It follows transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`
//! (`modeling_clip.py`) and reads the same tensor names: `text_model.*` and,
//! with a projection, `text_projection.weight`.
//!
//! Every tensor of the checkpoint is loaded, even the layers after the one a
//! pipeline reads (SDXL's first encoder stops at the penultimate layer), so a
//! checkpoint and the model always agree tensor for tensor; the unused layers
//! are simply not run.

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};

/// The feed-forward activation of the encoder layers (`hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Activation {
    /// `x * sigmoid(1.702 x)`: OpenAI CLIP (SD 1.x, SDXL's first encoder).
    QuickGelu,
    /// Exact, erf-based GELU: OpenCLIP (SD 2.x, SD-Turbo, SDXL's second encoder).
    Gelu,
}

impl Activation {
    /// Applies the activation.
    fn apply(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Activation::Gelu => xs.gelu_erf(),
        }
    }
}

/// The shape of a CLIP text encoder, as its `config.json` gives it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ClipConfig {
    /// Rows of the token embedding.
    pub(crate) vocab_size: usize,
    /// Width of the hidden states.
    pub(crate) hidden_size: usize,
    /// Width of the feed-forward layer.
    pub(crate) intermediate_size: usize,
    /// Encoder layers.
    pub(crate) num_hidden_layers: usize,
    /// Attention heads per layer.
    pub(crate) num_attention_heads: usize,
    /// Positions: the encoder's window (77 for every SD model).
    pub(crate) max_position_embeddings: usize,
    /// Feed-forward activation.
    pub(crate) hidden_act: Activation,
    /// Epsilon of every layer norm.
    pub(crate) layer_norm_eps: f64,
    /// Width of the pooled output's projection; `Some` only for
    /// `CLIPTextModelWithProjection` (SDXL's second encoder).
    pub(crate) projection_dim: Option<usize>,
}

/// Which hidden states a pipeline conditions the UNet on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layer {
    /// The last layer's output after the final layer norm (`last_hidden_state`): SD 1.x, 2.x.
    /// SD 2.x's "penultimate layer" is already baked in: diffusers' conversion drops
    /// OpenCLIP's last layer, leaving 23 of 24.
    Last,
    /// The output of the second-to-last layer, without the final layer norm
    /// (`hidden_states[-2]`): both SDXL encoders.
    Penultimate,
}

/// What one encoder pass returns.
#[derive(Debug)]
pub(crate) struct ClipOutput {
    /// Per-token states `[batch, window, hidden_size]` of the requested layer.
    pub(crate) states: Tensor,
    /// `final_layer_norm(last layer)[first eos]`: `[batch, hidden_size]`, present when
    /// the model has a projection; [`ClipTextModel::project`] turns it into the pooled
    /// text embedding. The projection is separate so that a caller can project the rows
    /// of several encoder passes in one product, as one pass over all of them would.
    pub(crate) pooled: Option<Tensor>,
}

/// A vector read in place of a token embedding: a textual-inversion embedding's.
#[derive(Clone, Debug)]
pub(crate) struct Insert {
    /// The batch row.
    pub(crate) row: usize,
    /// The position in the row.
    pub(crate) pos: usize,
    /// `[hidden_size]`, in the model's dtype.
    pub(crate) vector: Tensor,
}

/// One pre-norm encoder layer.
#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    activation: Activation,
}

impl EncoderLayer {
    /// Loads `encoder.layers.{i}`.
    fn new(vb: VarBuilder, c: &ClipConfig) -> candle_core::Result<Self> {
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        let attn = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        Ok(Self {
            layer_norm1: candle_nn::layer_norm(d, eps, vb.pp("layer_norm1"))?,
            q_proj: candle_nn::linear(d, d, attn.pp("q_proj"))?,
            k_proj: candle_nn::linear(d, d, attn.pp("k_proj"))?,
            v_proj: candle_nn::linear(d, d, attn.pp("v_proj"))?,
            out_proj: candle_nn::linear(d, d, attn.pp("out_proj"))?,
            layer_norm2: candle_nn::layer_norm(d, eps, vb.pp("layer_norm2"))?,
            fc1: candle_nn::linear(d, c.intermediate_size, mlp.pp("fc1"))?,
            fc2: candle_nn::linear(c.intermediate_size, d, mlp.pp("fc2"))?,
            heads: c.num_attention_heads,
            activation: c.hidden_act,
        })
    }

    /// Runs the layer on `[batch, seq, dim]` with an additive `[seq, seq]` mask.
    fn forward(&self, xs: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, s, d) = xs.dims3()?;
        let head_dim = d / self.heads;
        let h = self.layer_norm1.forward(xs)?;
        let split = |t: Tensor| {
            t.reshape((b, s, self.heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let scale = 1.0 / (head_dim as f64).sqrt();
        let q = split((self.q_proj.forward(&h)? * scale)?)?;
        let k = split(self.k_proj.forward(&h)?)?;
        let v = split(self.v_proj.forward(&h)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let attn = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
        let attn = attn.transpose(1, 2)?.reshape((b, s, d))?;
        let xs = (xs + self.out_proj.forward(&attn)?)?;
        let h = self.layer_norm2.forward(&xs)?;
        let h = self
            .fc2
            .forward(&self.activation.apply(&self.fc1.forward(&h)?)?)?;
        xs + h
    }
}

/// A CLIP text encoder (`CLIPTextModel`, optionally `WithProjection`).
#[derive(Debug)]
pub(crate) struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    /// `text_projection` (no bias), for the pooled output.
    projection: Option<Linear>,
    span: tracing::Span,
}

impl ClipTextModel {
    /// Loads the encoder from a checkpoint's root (`text_model.*`, `text_projection`).
    pub(crate) fn new(vb: VarBuilder, c: &ClipConfig) -> candle_core::Result<Self> {
        let text = vb.pp("text_model");
        let embeddings = text.pp("embeddings");
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::new(text.pp("encoder.layers").pp(i), c))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let projection = match c.projection_dim {
            Some(p) => Some(candle_nn::linear_no_bias(
                c.hidden_size,
                p,
                vb.pp("text_projection"),
            )?),
            None => None,
        };
        Ok(Self {
            token_embedding: candle_nn::embedding(
                c.vocab_size,
                c.hidden_size,
                embeddings.pp("token_embedding"),
            )?,
            position_embedding: candle_nn::embedding(
                c.max_position_embeddings,
                c.hidden_size,
                embeddings.pp("position_embedding"),
            )?,
            layers,
            final_layer_norm: candle_nn::layer_norm(
                c.hidden_size,
                c.layer_norm_eps,
                text.pp("final_layer_norm"),
            )?,
            projection,
            span: tracing::debug_span!("clip"),
        })
    }

    /// Returns the rows of the token embedding table.
    pub(crate) fn vocab_size(&self) -> candle_core::Result<usize> {
        self.token_embedding.embeddings().dim(0)
    }

    /// Encodes `ids` (`[batch, window]`); `eos` marks where each row's pooled state is read.
    ///
    /// Only the causal mask applies, no padding mask, as every SD model was trained.
    #[cfg(test)]
    pub(crate) fn forward(
        &self,
        ids: &Tensor,
        layer: Layer,
        eos: u32,
    ) -> candle_core::Result<ClipOutput> {
        self.forward_with(ids, layer, eos, &[])
    }

    /// Encodes `ids` as [`ClipTextModel::forward`] does, with the token embeddings at
    /// the positions of `inserts` replaced by their vectors (before the position
    /// embeddings are added, as transformers' `inputs_embeds`).
    pub(crate) fn forward_with(
        &self,
        ids: &Tensor,
        layer: Layer,
        eos: u32,
        inserts: &[Insert],
    ) -> candle_core::Result<ClipOutput> {
        let _entered = self.span.enter();
        let (batch, seq) = ids.dims2()?;
        let device = ids.device();
        let positions = Tensor::arange(0u32, seq as u32, device)?;
        let mut tokens = self.token_embedding.forward(ids)?;
        let width = tokens.dim(D::Minus1)?;
        for insert in inserts {
            let vector = insert
                .vector
                .to_dtype(tokens.dtype())?
                .reshape((1, 1, width))?;
            tokens = tokens.slice_assign(
                &[
                    insert.row..insert.row + 1,
                    insert.pos..insert.pos + 1,
                    0..width,
                ],
                &vector,
            )?;
        }
        let mut xs = tokens.broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(seq, device, xs.dtype())?;
        let depth = match layer {
            Layer::Last => self.layers.len(),
            Layer::Penultimate => self.layers.len().saturating_sub(1),
        };
        // Without a projection nothing needs the layers past `depth`.
        let run = if self.projection.is_some() {
            self.layers.len()
        } else {
            depth
        };
        let mut states = None;
        for (i, l) in self.layers.iter().take(run).enumerate() {
            if i == depth {
                states = Some(xs.clone());
            }
            xs = l.forward(&xs, &mask)?;
        }
        let last = match (layer, &self.projection) {
            (Layer::Last, _) | (_, Some(_)) => Some(self.final_layer_norm.forward(&xs)?),
            (Layer::Penultimate, None) => None,
        };
        let states = match (layer, states, &last) {
            (Layer::Last, _, Some(last)) => last.clone(),
            (Layer::Penultimate, Some(s), _) => s,
            _ => xs,
        };
        let pooled = match (&self.projection, &last) {
            (Some(_), Some(last)) => {
                let rows = ids.to_device(&Device::Cpu)?.to_vec2::<u32>()?;
                // transformers reads the first eos (for legacy configs: the argmax id,
                // which is eos in every CLIP vocabulary); a row without one uses its end.
                let index: Vec<u32> = rows
                    .iter()
                    .enumerate()
                    .map(|(r, row)| {
                        let at = row.iter().position(|&t| t == eos).unwrap_or(seq - 1);
                        (r * seq + at) as u32
                    })
                    .collect();
                let index = Tensor::from_vec(index, batch, device)?;
                let dim = last.dim(D::Minus1)?;
                Some(last.reshape((batch * seq, dim))?.index_select(&index, 0)?)
            }
            _ => None,
        };
        Ok(ClipOutput { states, pooled })
    }

    /// Returns `text_projection(pooled)` for pooled states `[rows, hidden_size]`, or
    /// `None` when the model has no projection.
    pub(crate) fn project(&self, pooled: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.projection
            .as_ref()
            .map(|p| p.forward(pooled))
            .transpose()
    }
}

/// Returns the additive causal mask `[seq, seq]` in `dtype`: 0 on and below the diagonal,
/// -inf above.
fn causal_mask(seq: usize, device: &Device, dtype: DType) -> candle_core::Result<Tensor> {
    let values: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (seq, seq), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::IndexOp;
    use candle_nn::VarMap;

    fn config(projection_dim: Option<usize>) -> ClipConfig {
        ClipConfig {
            vocab_size: 10,
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 3,
            num_attention_heads: 2,
            max_position_embeddings: 5,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-5,
            projection_dim,
        }
    }

    #[test]
    fn activations_match_their_formulas() -> candle_core::Result<()> {
        let x = Tensor::new(&[-1.0f32, 0.0, 0.5, 2.0], &Device::Cpu)?;
        let gelu = Activation::Gelu.apply(&x)?.to_vec1::<f32>()?;
        // GELU(x) = x * Phi(x): Phi(-1) = 0.158655, Phi(0.5) = 0.691462, Phi(2) = 0.977250.
        let expected = [-0.158_655_f32, 0.0, 0.345_731, 1.954_5];
        for (g, e) in gelu.iter().zip(expected) {
            assert!((g - e).abs() < 1e-5, "{gelu:?}");
        }
        let quick = Activation::QuickGelu.apply(&x)?.to_vec1::<f32>()?;
        let expected = 2.0 / (1.0 + (-1.702f32 * 2.0).exp());
        assert!((quick[3] - expected).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn penultimate_states_and_pooled_output() -> candle_core::Result<()> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = ClipTextModel::new(vb, &config(Some(6)))?;
        let ids = Tensor::new(&[[1u32, 4, 9, 0, 0], [1, 9, 0, 0, 0]], &Device::Cpu)?;
        let last = model.forward(&ids, Layer::Last, 9)?;
        let penultimate = model.forward(&ids, Layer::Penultimate, 9)?;
        assert_eq!(last.states.dims(), [2, 5, 8]);
        assert_eq!(penultimate.states.dims(), [2, 5, 8]);
        let diff = (&last.states - &penultimate.states)?
            .abs()?
            .sum_all()?
            .to_scalar::<f32>()?;
        assert!(diff > 0.0);
        // The pooled output is the same whichever layer the states come from.
        let (a, b) = (
            last.pooled
                .ok_or(candle_core::Error::Msg("no pooled".into()))?,
            penultimate
                .pooled
                .ok_or(candle_core::Error::Msg("no pooled".into()))?,
        );
        assert_eq!(a.dims(), [2, 8]);
        assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
        let projected = model
            .project(&a)?
            .ok_or(candle_core::Error::Msg("no projection".into()))?;
        assert_eq!(projected.dims(), [2, 6]);
        // Causality: row 0's first two states do not depend on later tokens.
        let other = Tensor::new(&[[1u32, 4, 2, 3, 3], [1, 9, 0, 0, 0]], &Device::Cpu)?;
        let changed = model.forward(&other, Layer::Last, 9)?;
        let head = |t: &Tensor| t.i((0, 0..2)).and_then(|t| t.to_vec2::<f32>());
        assert_eq!(head(&last.states)?, head(&changed.states)?);
        Ok(())
    }
}
