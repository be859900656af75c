//! Questions and conversations about one image, with answers streamed as they are generated.

use blip2_image::RgbImage;

use crate::model::ImageFeatures;
use crate::tokenizer::TextTokenizer;
use crate::{Blip2, Error, GenerationOptions, Result};

/// The prompt the BLIP-2 checkpoints answer questions best with; `{}` is the question.
pub const DEFAULT_QUESTION_TEMPLATE: &str = "Question: {} Answer:";

/// A prompt template with one `{}` where the question goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuestionTemplate(String);

impl QuestionTemplate {
    /// Checks that `template` has exactly one `{}`.
    pub fn new(template: &str) -> Result<Self> {
        if template.matches("{}").count() != 1 {
            return Err(Error::InvalidRequest(format!(
                "the question template {template:?} must contain exactly one {{}} where the question goes"
            )));
        }
        Ok(Self(template.to_owned()))
    }

    /// The template with `question` in place of `{}`.
    pub fn fill(&self, question: &str) -> String {
        self.0.replacen("{}", question, 1)
    }
}

impl Default for QuestionTemplate {
    fn default() -> Self {
        Self(DEFAULT_QUESTION_TEMPLATE.to_owned())
    }
}

/// Turns generated token ids into text pieces as they arrive.
///
/// A piece is only released once it decodes to whole characters (a byte-level
/// tokenizer can split one character over several tokens), leading whitespace of the
/// text is dropped and trailing whitespace is held back, so the pieces concatenate to
/// the final trimmed text.
#[derive(Debug)]
pub struct TextStreamer<'a> {
    tokenizer: &'a TextTokenizer,
    ids: Vec<u32>,
    decoded: String,
    pending_whitespace: String,
    started: bool,
}

impl<'a> TextStreamer<'a> {
    /// A streamer that decodes with `tokenizer`.
    pub fn new(tokenizer: &'a TextTokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            decoded: String::new(),
            pending_whitespace: String::new(),
            started: false,
        }
    }

    /// Adds one token; returns the text it completes, if any.
    pub fn push(&mut self, token: u32) -> Result<Option<String>> {
        self.ids.push(token);
        let text = self.tokenizer.decode(&self.ids)?;
        if text.ends_with(char::REPLACEMENT_CHARACTER) || !text.starts_with(&self.decoded) {
            // An incomplete character, or a decoder that rewrote earlier text: wait.
            return Ok(None);
        }
        let new = text[self.decoded.len()..].to_owned();
        self.decoded = text;
        Ok(self.shape(&new))
    }

    /// Releases whatever is still held back (except trailing whitespace).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let text = self.tokenizer.decode(&self.ids)?;
        let rest = text
            .strip_prefix(&self.decoded)
            .map(str::to_owned)
            .unwrap_or_default();
        self.decoded = text;
        Ok(self.shape(&rest))
    }

    fn shape(&mut self, new: &str) -> Option<String> {
        let new = if self.started { new } else { new.trim_start() };
        if new.is_empty() {
            return None;
        }
        let body = new.trim_end();
        if body.is_empty() {
            self.pending_whitespace.push_str(new);
            return None;
        }
        self.started = true;
        let piece = format!("{}{body}", std::mem::take(&mut self.pending_whitespace));
        self.pending_whitespace = new[body.len()..].to_owned();
        Some(piece)
    }
}

/// One answer in a conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The answer text, trimmed.
    pub text: String,
    /// The generated token ids, including the end-of-sequence token if one ended it.
    pub token_ids: Vec<u32>,
    /// The prompt the model was given.
    pub prompt: String,
    /// How many of the oldest turns were left out of the prompt to fit the model's
    /// position limit.
    pub dropped_turns: usize,
}

/// A conversation about one image: the image is encoded once, and every question is
/// asked with the earlier questions and answers folded into the prompt, the way the
/// BLIP-2 demos do it: `Question: q1 Answer: a1. Question: q2 Answer:`.
#[derive(Debug)]
pub struct Conversation<'a> {
    blip2: &'a Blip2,
    features: ImageFeatures,
    template: QuestionTemplate,
    turns: Vec<(String, String)>,
}

impl<'a> Conversation<'a> {
    /// Starts a conversation about `image`, running the image encoder once.
    pub fn new(blip2: &'a Blip2, image: &RgbImage) -> Result<Self> {
        let pixels = blip2.pixel_values(std::slice::from_ref(image))?;
        let features = blip2.encode_images(&pixels)?;
        Ok(Self::from_features(blip2, features))
    }

    /// Starts a conversation about an image already encoded (batch of one).
    pub fn from_features(blip2: &'a Blip2, features: ImageFeatures) -> Self {
        Self {
            blip2,
            features,
            template: QuestionTemplate::default(),
            turns: Vec::new(),
        }
    }

    /// Resumes a conversation from its parts (as returned by [`Conversation::into_parts`]),
    /// for callers that keep conversations between requests.
    pub fn from_parts(
        blip2: &'a Blip2,
        features: ImageFeatures,
        template: QuestionTemplate,
        turns: Vec<(String, String)>,
    ) -> Self {
        Self {
            blip2,
            features,
            template,
            turns,
        }
    }

    /// The encoded image, the template and the turns, to keep and resume later.
    pub fn into_parts(self) -> (ImageFeatures, QuestionTemplate, Vec<(String, String)>) {
        (self.features, self.template, self.turns)
    }

    /// Uses another question template from now on.
    pub fn set_template(&mut self, template: QuestionTemplate) {
        self.template = template;
    }

    /// The questions and answers so far.
    pub fn turns(&self) -> &[(String, String)] {
        &self.turns
    }

    /// Forgets the earlier turns (the image stays encoded).
    pub fn reset(&mut self) {
        self.turns.clear();
    }

    /// The prompt for `question` with the turns from `first_turn` on.
    pub fn prompt(&self, question: &str, first_turn: usize) -> String {
        let mut parts: Vec<String> = self.turns[first_turn..]
            .iter()
            .map(|(q, a)| format!("{} {a}.", self.template.fill(q)))
            .collect();
        parts.push(self.template.fill(question));
        parts.join(" ")
    }

    /// Answers `question` and records the turn; `on_text` receives the answer as it is
    /// generated (in one piece at the end for beam search).
    ///
    /// When the prompt would not fit the model's positions, the oldest turns are left
    /// out; if the question alone does not fit, the error says so and nothing is recorded.
    pub fn ask(
        &mut self,
        question: &str,
        options: &GenerationOptions,
        on_text: Option<&mut dyn FnMut(&str)>,
    ) -> Result<Answer> {
        let question = question.trim();
        if question.is_empty() {
            return Err(Error::InvalidRequest("the question is empty".into()));
        }
        let mut first_turn = 0;
        let prompt = loop {
            let prompt = self.prompt(question, first_turn);
            match self.blip2.check_prompt_fits(&prompt, options) {
                Ok(()) => break prompt,
                Err(error) if first_turn == self.turns.len() => return Err(error),
                Err(_) => first_turn += 1,
            }
        };
        if first_turn > 0 {
            tracing::info!(
                dropped = first_turn,
                "left the oldest turns out of the prompt to fit the model"
            );
        }
        let caption = self
            .blip2
            .generate_streaming(&self.features, &prompt, options, on_text)?;
        self.turns.push((question.to_owned(), caption.text.clone()));
        Ok(Answer {
            text: caption.text,
            token_ids: caption.token_ids,
            prompt,
            dropped_turns: first_turn,
        })
    }
}
