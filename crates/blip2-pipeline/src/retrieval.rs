//! Image and text embeddings and image-text matching scores, as
//! `Blip2ForImageTextRetrieval` defines them.
//!
//! - **ITC** (image-text contrastive) similarity: the cosine similarity between the text
//!   embedding and each query's image embedding, maximised over the queries. Both
//!   embeddings are unit vectors, so it lies in [-1, 1]; matching pairs score higher.
//! - **ITM** (image-text matching) probability: the Q-Former reads the text together
//!   with the queries, the matching head gives "no match"/"match" logits per query,
//!   they are averaged over the queries, and the softmax of the "match" logit is the
//!   probability, in [0, 1].

use blip2_image::RgbImage;
use candle_core::{D, DType, Module, Tensor};

use crate::model::ImageFeatures;
use crate::{Blip2, Error, Result};

/// Scores of one text against one image.
#[derive(Debug, Clone, PartialEq)]
pub struct MatchScore {
    /// The text.
    pub text: String,
    /// ITM probability that the text describes the image, in [0, 1].
    pub itm_probability: f32,
    /// ITM logits `[no match, match]`, averaged over the queries.
    pub itm_logits: [f32; 2],
    /// ITC cosine similarity, maximised over the queries, in [-1, 1].
    pub itc_similarity: f32,
}

/// Token ids of a batch of texts, padded on the right.
#[derive(Debug, Clone)]
pub struct TextBatch {
    /// `[texts, longest]` token ids (u32).
    pub input_ids: Tensor,
    /// `[texts, longest]`: 1 for tokens, 0 for padding.
    pub attention_mask: Tensor,
}

/// Unit vectors along the last dimension (`torch.nn.functional.normalize`).
pub fn normalize(xs: &Tensor) -> Result<Tensor> {
    let norm = xs
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    Ok(xs.broadcast_div(&norm)?)
}

/// ITC similarity `[images, texts]` from image embeddings `[images, queries, dim]` and
/// text embeddings `[texts, dim]`: the best query's cosine similarity.
pub fn contrastive_similarity(image_embeds: &Tensor, text_embeds: &Tensor) -> Result<Tensor> {
    let (images, queries, dim) = image_embeds.dims3()?;
    let per_query = image_embeds
        .reshape((images * queries, dim))?
        .matmul(&text_embeds.t()?)?;
    let texts = text_embeds.dim(0)?;
    Ok(per_query.reshape((images, queries, texts))?.max(1)?)
}

/// Quotes `text`, cut after 40 characters: enough to tell which text an error is about
/// without repeating a long one whole.
fn quote_start(text: &str) -> String {
    const SHOWN: usize = 40;
    match text.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{:?}…", &text[..end]),
        None => format!("{text:?}"),
    }
}

impl Blip2 {
    /// Tokenizes texts for the Q-Former (`[CLS] ... [SEP]`), padding on the right.
    pub fn tokenize_texts(&self, texts: &[&str]) -> Result<TextBatch> {
        if texts.is_empty() {
            return Err(Error::InvalidRequest("no texts given".into()));
        }
        // The model scores an empty text like any other, so the score would mean nothing.
        if let Some(position) = texts.iter().position(|text| text.trim().is_empty()) {
            return Err(Error::InvalidRequest(format!(
                "text {} of {} ({:?}) is empty; give words to embed or match",
                position + 1,
                texts.len(),
                texts[position]
            )));
        }
        let heads = self.model().retrieval_heads()?;
        let limit = heads.embeddings.max_positions();
        let ids = texts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let ids = self.tokenizer().encode(text)?;
                if ids.len() > limit {
                    let text_label = match texts.len() {
                        1 => "the text".to_owned(),
                        count => format!("text {} of {count}", i + 1),
                    };
                    return Err(Error::InvalidRequest(format!(
                        "{text_label} {} has {} tokens, but the Q-Former reads at most {limit}",
                        quote_start(text),
                        ids.len()
                    )));
                }
                Ok(ids)
            })
            .collect::<Result<Vec<_>>>()?;
        let longest = ids.iter().map(Vec::len).max().unwrap_or(0);
        let pad = self
            .model()
            .config()
            .qformer_config
            .pad_token_id
            .unwrap_or(0);
        let mut flat_ids = Vec::with_capacity(texts.len() * longest);
        let mut mask = Vec::with_capacity(texts.len() * longest);
        for row in &ids {
            flat_ids.extend(
                row.iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad, longest - row.len())),
            );
            mask.extend(
                std::iter::repeat_n(1u32, row.len())
                    .chain(std::iter::repeat_n(0, longest - row.len())),
            );
        }
        let device = self.device();
        Ok(TextBatch {
            input_ids: Tensor::from_vec(flat_ids, (texts.len(), longest), device)?,
            attention_mask: Tensor::from_vec(mask, (texts.len(), longest), device)?,
        })
    }

    /// Q-Former outputs for texts alone `[texts, tokens, hidden]` (the text side of ITC).
    pub fn text_features(&self, batch: &TextBatch) -> Result<Tensor> {
        let heads = self.model().retrieval_heads()?;
        let embeddings = heads.embeddings.forward(&batch.input_ids)?;
        Ok(self
            .model()
            .qformer()
            .forward(&embeddings, 0, Some(&batch.attention_mask), None)?)
    }

    /// Normalised text embeddings `[texts, dim]`: the projected `[CLS]` output.
    pub fn text_embeds(&self, texts: &[&str]) -> Result<Tensor> {
        let batch = self.tokenize_texts(texts)?;
        let hidden = self.text_features(&batch)?;
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        normalize(
            &self
                .model()
                .retrieval_heads()?
                .text_projection
                .forward(&cls)?,
        )
    }

    /// Normalised image embeddings `[images, queries, dim]`: each projected query output.
    pub fn image_embeds(&self, features: &ImageFeatures) -> Result<Tensor> {
        let heads = self.model().retrieval_heads()?;
        normalize(
            &heads
                .vision_projection
                .forward(&features.queries.to_dtype(DType::F32)?)?,
        )
    }

    /// ITM logits `[images, texts, 2]` (`[no match, match]`, averaged over the queries).
    pub fn matching_logits(&self, features: &ImageFeatures, texts: &[&str]) -> Result<Tensor> {
        let heads = self.model().retrieval_heads()?;
        let batch = self.tokenize_texts(texts)?;
        let text_embeddings = heads.embeddings.forward(&batch.input_ids)?;
        let count = texts.len();
        let queries = self.model().query_tokens();
        let (_, num_queries, hidden) = queries.dims3()?;
        let query_batch = queries.expand((count, num_queries, hidden))?;
        let embeddings = Tensor::cat(
            &[
                &query_batch,
                &text_embeddings.to_dtype(query_batch.dtype())?,
            ],
            1,
        )?;
        let query_mask = Tensor::ones((count, num_queries), DType::U32, self.device())?;
        let mask = Tensor::cat(&[&query_mask, &batch.attention_mask], 1)?;

        let images = features.vision.dim(0)?;
        let mut per_image = Vec::with_capacity(images);
        for image in 0..images {
            let vision = features.vision.get(image)?.unsqueeze(0)?;
            let (_, patches, width) = vision.dims3()?;
            let vision = vision.expand((count, patches, width))?;
            let output = self.model().qformer().forward(
                &embeddings,
                num_queries,
                Some(&mask),
                Some(&vision),
            )?;
            let logits = heads.itm_head.forward(&output.narrow(1, 0, num_queries)?)?;
            per_image.push(logits.mean(1)?);
        }
        Ok(Tensor::stack(&per_image, 0)?)
    }

    /// ITM probabilities and ITC similarities of each text against one image.
    pub fn match_texts(&self, image: &RgbImage, texts: &[&str]) -> Result<Vec<MatchScore>> {
        let pixels = self.pixel_values(std::slice::from_ref(image))?;
        let features = self.encode_images(&pixels)?;
        let logits = self.matching_logits(&features, texts)?.squeeze(0)?;
        let probabilities = candle_nn::ops::softmax_last_dim(&logits)?.to_vec2::<f32>()?;
        let logits = logits.to_vec2::<f32>()?;
        let similarity =
            contrastive_similarity(&self.image_embeds(&features)?, &self.text_embeds(texts)?)?
                .squeeze(0)?
                .to_vec1::<f32>()?;
        Ok(texts
            .iter()
            .enumerate()
            .map(|(i, text)| MatchScore {
                text: (*text).to_owned(),
                itm_probability: probabilities[i][1],
                itm_logits: [logits[i][0], logits[i][1]],
                itc_similarity: similarity[i],
            })
            .collect())
    }
}
