//! A render's text conditioning over its steps: the prompt and the negative
//! prompt prepared (`kiln_domain::prompt::prepare`: extra-network tags out,
//! prompt editing and alternation scheduled, weights parsed), every distinct
//! stage text encoded once, and which rows hold at each step.
//!
//! The rows of a render are the negative prompt's distinct stage texts (with
//! guidance), then the prompt's, encoded in one batch and padded to one chunk
//! count. A prompt without editing has one stage, so a guided render has the
//! rows (negative, prompt) it always had and the same bytes. At UNet call
//! `counter` (0 for the first step run), each branch uses the stage the web
//! UI's `reconstruct_cond_batch` picks ([`kiln_domain::prompt::stage_at`]).
//! For img2img the counter starts at 0 with the first step actually run, as
//! the web UI's denoiser counts, while the schedule spans the recipe's steps.

use candle_core::{Device, Tensor};
use kiln_domain::prompt::{Stage, prepare, stage_at};

use super::text::TextRow;
use super::text_extras::TextExtras;
use super::unet::{AddedConditioning, Conditioning};
use super::{Pipeline, PipelineError, config};

/// One branch's schedule: each stage's end and the row that holds its text.
#[derive(Clone, Debug)]
struct Branch {
    /// The prepared stages.
    stages: Vec<Stage>,
    /// Per stage, its row in [`Scheduled::all`].
    rows: Vec<usize>,
}

impl Branch {
    /// The row at UNet call `counter`.
    fn row_at(&self, counter: u32) -> usize {
        self.rows[stage_at(&self.stages, counter)]
    }
}

/// The conditioning of one render, every step.
#[derive(Clone, Debug)]
pub(crate) struct Scheduled {
    /// Every row any step needs.
    all: Conditioning,
    /// Rows in `all`.
    count: usize,
    /// The negative prompt's schedule; `None` without guidance.
    negative: Option<Branch>,
    /// The prompt's schedule.
    positive: Branch,
}

impl Scheduled {
    /// Returns the rows at UNet call `counter`: (negative, prompt) with guidance,
    /// else the prompt's.
    pub(crate) fn rows_at(&self, counter: u32) -> Vec<usize> {
        self.negative
            .iter()
            .map(|n| n.row_at(counter))
            .chain([self.positive.row_at(counter)])
            .collect()
    }

    /// Returns the conditioning of the given rows, in that order.
    ///
    /// Rows that are all of them in order (every render without editing) give
    /// the encoded tensors themselves.
    pub(crate) fn select(&self, rows: &[usize]) -> Result<Conditioning, PipelineError> {
        if rows.len() == self.count && rows.iter().enumerate().all(|(i, &r)| i == r) {
            return Ok(self.all.clone());
        }
        let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let ids = Tensor::from_vec(ids, rows.len(), &Device::Cpu)?
            .to_device(self.all.context.device())?;
        let pick = |t: &Tensor| t.index_select(&ids, 0);
        Ok(Conditioning {
            context: pick(&self.all.context)?,
            added: match &self.all.added {
                Some(a) => Some(AddedConditioning {
                    text_embeds: pick(&a.text_embeds)?,
                    time_ids: pick(&a.time_ids)?,
                }),
                None => None,
            },
            image: self.all.image.as_ref().map(pick).transpose()?,
        })
    }

    /// True when the text changes during the render.
    #[cfg(test)]
    pub(crate) fn changes(&self) -> bool {
        self.negative
            .iter()
            .chain([&self.positive])
            .any(|b| b.stages.len() > 1)
    }
}

/// Prepares one branch and appends its distinct stage texts to `texts`.
fn branch(
    field: &'static str,
    prompt: &str,
    steps: u32,
    texts: &mut Vec<(Vec<kiln_domain::prompt::Piece>, bool)>,
    negative: bool,
) -> Result<Branch, PipelineError> {
    let stages = prepare(prompt, steps).map_err(|e| PipelineError::InvalidRecipe {
        field,
        message: e.to_string(),
    })?;
    let first = texts.len();
    let mut seen: Vec<&str> = Vec::new();
    let mut rows = Vec::with_capacity(stages.len());
    for stage in &stages {
        let row = match seen.iter().position(|t| *t == stage.text) {
            Some(i) => first + i,
            None => {
                seen.push(&stage.text);
                texts.push((stage.pieces.clone(), negative && prompt.is_empty()));
                texts.len() - 1
            }
        };
        rows.push(row);
    }
    Ok(Branch { stages, rows })
}

impl Pipeline {
    /// Returns the conditioning of one render over `steps` steps: text states for
    /// every row (negative prompt stages first when `negative` is given), SDXL's
    /// added conditioning, and `image` (`[1, 1 + latent channels, h, w]`, f32)
    /// repeated for each row.
    ///
    /// SDXL's time ids are diffusers' defaults: original size = target size = the
    /// image's (height, width), crop top-left (0, 0). Everything is in the UNet's dtype.
    /// The recipe's text-encoder LoRAs and embeddings (`extras`) apply.
    ///
    /// # Errors
    ///
    /// `InvalidRecipe` on `prompt` or `negative_prompt` for a prompt kiln cannot
    /// read; `Tokenizer` or `Candle` when encoding fails.
    pub(crate) fn scheduled_conditioning(
        &self,
        prompt: &str,
        negative: Option<&str>,
        steps: u32,
        latent_size: (usize, usize),
        image: Option<Tensor>,
        extras: &TextExtras,
    ) -> Result<Scheduled, PipelineError> {
        let mut texts = Vec::new();
        let negative = match negative {
            Some(n) => Some(branch("negative_prompt", n, steps, &mut texts, true)?),
            None => None,
        };
        let positive = branch("prompt", prompt, steps, &mut texts, false)?;
        let rows: Vec<TextRow<'_>> = texts
            .iter()
            .map(|(pieces, empty_negative)| TextRow {
                pieces,
                empty_negative: *empty_negative,
            })
            .collect();
        let count = rows.len();
        let all = self.rows_conditioning(&rows, latent_size, image, extras)?;
        Ok(Scheduled {
            all,
            count,
            negative,
            positive,
        })
    }

    /// Encodes `rows` and adds SDXL's added conditioning and the image input for each.
    fn rows_conditioning(
        &self,
        rows: &[TextRow<'_>],
        (latent_height, latent_width): (usize, usize),
        image: Option<Tensor>,
        extras: &TextExtras,
    ) -> Result<Conditioning, PipelineError> {
        let dtype = self.precision.dtype();
        let text = self.text.encode_rows(rows, extras)?;
        let rows = text.context.dim(0)?;
        let added = match text.pooled {
            Some(text_embeds) => {
                let h = (latent_height * self.vae_downscale) as f32;
                let w = (latent_width * self.vae_downscale) as f32;
                let ids: Vec<f32> = (0..rows).flat_map(|_| [h, w, 0.0, 0.0, h, w]).collect();
                let time_ids = Tensor::from_vec(ids, (rows, config::SDXL_TIME_IDS), &self.device)?
                    .to_dtype(dtype)?;
                Some(AddedConditioning {
                    text_embeds,
                    time_ids,
                })
            }
            None => None,
        };
        let image = match image {
            Some(image) => {
                let image = image.to_dtype(dtype)?;
                Some(Tensor::cat(&vec![&image; rows], 0)?)
            }
            None => None,
        };
        Ok(Conditioning {
            context: text.context,
            added,
            image,
        })
    }
}
