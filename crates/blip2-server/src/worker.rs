//! The model worker: one thread that takes jobs from the queue and runs them, decoding
//! the image, encoding it and generating, and keeps the conversations.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use blip2_image::RgbImage;
use blip2_pipeline::{Blip2, Conversation, GenerationOptions, ImageFeatures, QuestionTemplate};
use candle_core::{DType, Tensor};
use tokio::sync::mpsc;

use crate::decoding::Settings;
use crate::error::ApiError;
use crate::form::Upload;
use crate::queue::{Gate, JobQueue, Ticket};
use crate::results::{AskResult, CaptionResult, EmbedResult, MatchResult, TextScore};
use crate::sessions::{Session, SessionStore};

/// The model work a request needs, already checked against the limits.
#[derive(Debug)]
pub(crate) enum Work {
    Caption {
        image: Upload,
        prompt: String,
        options: GenerationOptions,
        start_session: bool,
    },
    Ask {
        source: AskSource,
        question: String,
        template: Option<QuestionTemplate>,
        options: GenerationOptions,
    },
    Embed {
        image: Option<Upload>,
        texts: Vec<String>,
    },
    Match {
        image: Upload,
        texts: Vec<String>,
    },
}

impl Work {
    fn kind(&self) -> &'static str {
        match self {
            Self::Caption { .. } => "caption",
            Self::Ask { .. } => "ask",
            Self::Embed { .. } => "embed",
            Self::Match { .. } => "match",
        }
    }
}

/// The image a question is about.
#[derive(Debug)]
pub(crate) enum AskSource {
    /// A new image, which starts a new session.
    Image(Upload),
    /// The id of a kept session.
    Session(String),
}

/// A message from the worker to the request handler.
#[derive(Debug)]
pub(crate) enum JobEvent {
    /// A piece of generated text (only for streaming requests).
    Text(String),
    /// The JSON result (serialized, one line) or the error; always the last event.
    Finished(Result<String, ApiError>),
}

/// A queued request.
#[derive(Debug)]
pub(crate) struct Job {
    pub id: u64,
    pub work: Work,
    pub ticket: Ticket,
    pub events: mpsc::UnboundedSender<JobEvent>,
    /// Whether to send [`JobEvent::Text`] pieces.
    pub stream: bool,
    pub enqueued: Instant,
    /// The job is not started after this instant.
    pub deadline: Instant,
}

/// The worker thread's state.
pub(crate) struct Worker {
    pub blip2: Arc<Blip2>,
    pub queue: Arc<JobQueue>,
    pub gate: Arc<Gate>,
    pub sessions: SessionStore,
    pub image_options: blip2_image::LoadOptions,
    pub request_timeout: Duration,
}

impl Worker {
    /// Starts the thread; it ends when the queue is closed and empty.
    pub fn spawn(self, receiver: mpsc::Receiver<Job>) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("blip2-model".into())
            .spawn(move || self.run(receiver))
    }

    fn run(mut self, mut receiver: mpsc::Receiver<Job>) {
        tracing::info!("model worker started");
        while let Some(job) = receiver.blocking_recv() {
            self.queue.job_taken();
            self.gate.wait_until_open();
            let ran = self.handle(job);
            self.queue.job_done(ran);
        }
        tracing::info!("model worker stopped");
    }

    /// Runs one job unless it waited too long or was cancelled; returns how long it ran.
    fn handle(&mut self, job: Job) -> Option<Duration> {
        let kind = job.work.kind();
        let _span = tracing::info_span!("job", id = job.id, kind).entered();
        if Instant::now() >= job.deadline && job.ticket.try_cancel() {
            tracing::info!(
                waited_ms = job.enqueued.elapsed().as_millis() as u64,
                "not started: the job waited longer than the request timeout"
            );
            let error = self.queue.timeout_error(self.request_timeout);
            let _ = job.events.send(JobEvent::Finished(Err(error)));
            return None;
        }
        if !job.ticket.try_start() {
            tracing::info!("not started: the request timed out or its client disconnected");
            return None;
        }

        let queued = job.enqueued.elapsed();
        let started = Instant::now();
        let events = job.events;
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let mut on_text = |piece: &str| {
                if job.stream {
                    // A closed channel means the client left; the job still runs to its end.
                    let _ = events.send(JobEvent::Text(piece.to_owned()));
                }
            };
            self.execute(job.work, &mut on_text)
        }));
        let ran = started.elapsed();
        let result = outcome.unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(ApiError::internal(format!(
                "the model worker failed on this request: {message}"
            )))
        });
        let timings = Timings {
            queued_ms: queued.as_millis() as u64,
            compute_ms: ran.as_millis() as u64,
        };
        let result = result.and_then(|result| result.into_json(timings));
        match &result {
            Ok(_) => tracing::info!(timings.queued_ms, timings.compute_ms, "done"),
            Err(error) if error.status.is_server_error() => {
                tracing::error!(%error, timings.compute_ms, "failed")
            }
            Err(error) => tracing::info!(%error, "rejected"),
        }
        let _ = events.send(JobEvent::Finished(result));
        Some(ran)
    }

    fn execute(
        &mut self,
        work: Work,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<JobResult, ApiError> {
        Ok(match work {
            Work::Caption {
                image,
                prompt,
                options,
                start_session,
            } => JobResult::Caption(self.caption(
                &image,
                &prompt,
                &options,
                start_session,
                on_text,
            )?),
            Work::Ask {
                source,
                question,
                template,
                options,
            } => JobResult::Ask(self.ask(source, &question, template, &options, on_text)?),
            Work::Embed { image, texts } => JobResult::Embed(self.embed(image.as_ref(), texts)?),
            Work::Match { image, texts } => JobResult::Match(self.match_texts(&image, texts)?),
        })
    }

    fn caption(
        &mut self,
        upload: &Upload,
        prompt: &str,
        options: &GenerationOptions,
        start_session: bool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<CaptionResult, ApiError> {
        let image = self.decode(upload)?;
        self.blip2.check_prompt_fits(prompt, options)?;
        let features = self.encode(&image)?;
        let caption = self
            .blip2
            .generate_streaming(&features, prompt, options, Some(on_text))?;
        let session = if start_session {
            let id = SessionStore::new_id()?;
            self.keep_session(
                id.clone(),
                Session {
                    features,
                    template: QuestionTemplate::default(),
                    turns: Vec::new(),
                },
            );
            Some(id)
        } else {
            None
        };
        Ok(CaptionResult {
            caption: caption.text,
            token_ids: caption.token_ids,
            ended_with_eos: caption.ended_with_eos,
            score: caption.score,
            session,
            settings: Settings::of(options),
        })
    }

    fn ask(
        &mut self,
        source: AskSource,
        question: &str,
        template: Option<QuestionTemplate>,
        options: &GenerationOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<AskResult, ApiError> {
        let (id, mut session, is_new) = match source {
            AskSource::Image(upload) => {
                let image = self.decode(&upload)?;
                let template = template.clone().unwrap_or_default();
                // Checked before the image is encoded, so a question that can never fit
                // costs no model time.
                self.blip2
                    .check_prompt_fits(&template.fill(question.trim()), options)?;
                let session = Session {
                    features: self.encode(&image)?,
                    template,
                    turns: Vec::new(),
                };
                (SessionStore::new_id()?, session, true)
            }
            AskSource::Session(id) => {
                let session = self
                    .sessions
                    .take(&id)
                    .ok_or_else(|| self.session_not_found(&id))?;
                (id, session, false)
            }
        };
        if let Some(template) = template {
            session.template = template;
        }

        let blip2 = Arc::clone(&self.blip2);
        let mut conversation =
            Conversation::from_parts(&blip2, session.features, session.template, session.turns);
        let answered = conversation.ask(question, options, Some(on_text));
        let (features, template, mut turns) = conversation.into_parts();
        let answer = match answered {
            Ok(answer) => answer,
            Err(error) => {
                // A failed question records nothing, so a kept session stays as it was.
                if !is_new {
                    self.keep_session(
                        id,
                        Session {
                            features,
                            template,
                            turns,
                        },
                    );
                }
                return Err(error.into());
            }
        };
        // The prompt only grows, so turns left out this time would be left out next time.
        turns.drain(..answer.dropped_turns.min(turns.len()));
        let kept_turns = turns.len();
        self.keep_session(
            id.clone(),
            Session {
                features,
                template,
                turns,
            },
        );
        Ok(AskResult {
            answer: answer.text,
            session: id,
            question: question.trim().to_owned(),
            turns: kept_turns,
            dropped_turns: answer.dropped_turns,
            token_ids: answer.token_ids,
            prompt: answer.prompt,
            settings: Settings::of(options),
        })
    }

    fn embed(
        &mut self,
        upload: Option<&Upload>,
        texts: Vec<String>,
    ) -> Result<EmbedResult, ApiError> {
        let retrieval = self.blip2.model().retrieval_heads().is_ok();
        let mut result = EmbedResult {
            model_kind: if retrieval { "retrieval" } else { "captioning" },
            qformer_last_hidden_state: None,
            image_embeds: None,
            text_embeds: None,
            texts: Vec::new(),
        };
        if let Some(upload) = upload {
            let image = self.decode(upload)?;
            let features = self.encode(&image)?;
            result.qformer_last_hidden_state = Some(rows(&features.queries.squeeze(0)?)?);
            if retrieval {
                let embeds = self.blip2.image_embeds(&features)?;
                result.image_embeds = Some(rows(&embeds.squeeze(0)?)?);
            }
        }
        if !texts.is_empty() {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            result.text_embeds = Some(rows(&self.blip2.text_embeds(&refs)?)?);
            result.texts = texts;
        }
        Ok(result)
    }

    fn match_texts(
        &mut self,
        upload: &Upload,
        texts: Vec<String>,
    ) -> Result<MatchResult, ApiError> {
        let image = self.decode(upload)?;
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let scores = self.blip2.match_texts(&image, &refs)?;
        Ok(MatchResult {
            scores: scores
                .into_iter()
                .map(|score| TextScore {
                    text: score.text,
                    itm_probability: score.itm_probability,
                    itc_similarity: score.itc_similarity,
                    itm_logits: score.itm_logits,
                })
                .collect(),
        })
    }

    fn decode(&self, upload: &Upload) -> Result<RgbImage, ApiError> {
        blip2_image::decode_image_named(&upload.bytes, &upload.name, &self.image_options)
            .map_err(ApiError::from_image)
    }

    fn encode(&self, image: &RgbImage) -> Result<ImageFeatures, ApiError> {
        let pixels = self.blip2.pixel_values(std::slice::from_ref(image))?;
        Ok(self.blip2.encode_images(&pixels)?)
    }

    fn keep_session(&mut self, id: String, session: Session) {
        if let Some(evicted) = self.sessions.insert(id, session) {
            tracing::info!(
                session = evicted,
                "evicted the least recently used conversation to make room"
            );
        }
    }

    fn session_not_found(&self, id: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "session_not_found",
            format!(
                "no conversation has the id {:?}: it was evicted to make room for newer ones (this \
                 server keeps {}, set by --max-sessions) or the server restarted; send the image \
                 again to start a new conversation",
                id.chars().take(64).collect::<String>(),
                self.sessions.capacity()
            ),
        )
    }
}

/// How long a job waited and computed, added to every result.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Timings {
    queued_ms: u64,
    compute_ms: u64,
}

enum JobResult {
    Caption(CaptionResult),
    Ask(AskResult),
    Embed(EmbedResult),
    Match(MatchResult),
}

impl JobResult {
    /// Serializes the result with its timings as one line of JSON. Floats are written in their
    /// shortest `f32` form.
    fn into_json(self, timings: Timings) -> Result<String, ApiError> {
        #[derive(serde::Serialize)]
        struct Timed<T> {
            #[serde(flatten)]
            result: T,
            timings: Timings,
        }
        let json = match self {
            Self::Caption(result) => serde_json::to_string(&Timed { result, timings }),
            Self::Ask(result) => serde_json::to_string(&Timed { result, timings }),
            Self::Embed(result) => serde_json::to_string(&Timed { result, timings }),
            Self::Match(result) => serde_json::to_string(&Timed { result, timings }),
        };
        json.map_err(|e| ApiError::internal(format!("cannot serialize the result: {e}")))
    }
}

/// The rows of a 2-D tensor as `f32`.
fn rows(tensor: &Tensor) -> Result<Vec<Vec<f32>>, ApiError> {
    Ok(tensor.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}
