//! The JSON bodies of successful responses.

use serde::Serialize;

use crate::decoding::Settings;

/// `/api/caption`.
#[derive(Debug, Serialize)]
pub(crate) struct CaptionResult {
    pub caption: String,
    pub token_ids: Vec<u32>,
    pub ended_with_eos: bool,
    /// Beam search score (length-normalised log-probability) when beams were used.
    pub score: Option<f32>,
    /// A conversation about the same image, when the request asked for one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    pub settings: Settings,
}

/// `/api/ask`.
#[derive(Debug, Serialize)]
pub(crate) struct AskResult {
    pub answer: String,
    /// Send it back as the `session` field to ask a follow-up question.
    pub session: String,
    pub question: String,
    /// Turns kept in the session, this one included.
    pub turns: usize,
    /// Oldest turns left out of the prompt (and forgotten) to fit the model's positions.
    pub dropped_turns: usize,
    pub token_ids: Vec<u32>,
    /// The prompt the language model was given.
    pub prompt: String,
    pub settings: Settings,
}

/// `/api/embed`. Rows are images' queries or texts; values are `f32`.
#[derive(Debug, Serialize)]
pub(crate) struct EmbedResult {
    /// `captioning` or `retrieval`.
    pub model_kind: &'static str,
    /// Q-Former query outputs `[queries, hidden]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qformer_last_hidden_state: Option<Vec<Vec<f32>>>,
    /// Normalised image embeddings `[queries, dim]` (retrieval checkpoints).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_embeds: Option<Vec<Vec<f32>>>,
    /// Normalised text embeddings `[texts, dim]` (retrieval checkpoints).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_embeds: Option<Vec<Vec<f32>>>,
    pub texts: Vec<String>,
}

/// One text's scores in `/api/match`.
#[derive(Debug, Serialize)]
pub(crate) struct TextScore {
    pub text: String,
    pub itm_probability: f32,
    pub itc_similarity: f32,
    pub itm_logits: [f32; 2],
}

/// `/api/match`.
#[derive(Debug, Serialize)]
pub(crate) struct MatchResult {
    pub scores: Vec<TextScore>,
}
