use std::path::PathBuf;

/// Everything that can go wrong loading a checkpoint or running the pipeline.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file the checkpoint needs is not in its directory.
    #[error("{path} not found: {what}")]
    MissingFile {
        /// The path that was looked for.
        path: PathBuf,
        /// What the file is and how to get it.
        what: String,
    },

    /// A file was given where a checkpoint directory or hub id is expected.
    #[error(
        "{path} is a file, but --model expects a checkpoint directory (the one containing \
         config.json, model.safetensors and tokenizer.json) or a Hugging Face hub id such as \
         Salesforce/blip2-opt-2.7b"
    )]
    ModelIsFile {
        /// The file.
        path: PathBuf,
    },

    /// The checkpoint has PyTorch pickle weights only.
    #[error(
        "{dir} has only PyTorch pickle weights ({file}); they are not loaded because unpickling can run \
         arbitrary code. Convert them to safetensors once, for example with Python: \
         `from transformers import Blip2ForConditionalGeneration as M; M.from_pretrained(DIR).save_pretrained(DIR)` \
         (transformers writes model.safetensors by default)"
    )]
    PickleOnly {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The pickle file found.
        file: String,
    },

    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A file or directory could not be created.
    #[error("cannot create {path}: {source}")]
    Create {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A JSON file is malformed or a field has the wrong type.
    #[error("invalid {path}: {message}")]
    InvalidJson {
        /// The file.
        path: PathBuf,
        /// Where and what (serde's message, with the field path).
        message: String,
    },

    /// A config value the model cannot be built from.
    #[error("invalid {path}: {source}")]
    InvalidConfig {
        /// The config file.
        path: PathBuf,
        /// The field and the reason.
        source: blip2_nn::ConfigError,
    },

    /// The checkpoint describes a model this crate does not implement.
    #[error("unsupported model in {path}: {message}")]
    Unsupported {
        /// The config file.
        path: PathBuf,
        /// What is unsupported and what is.
        message: String,
    },

    /// A weight is missing, has the wrong shape or cannot be read.
    #[error("cannot load weights from {dir}: {source}")]
    Weights {
        /// The checkpoint directory.
        dir: PathBuf,
        /// candle's error, which names the tensor.
        source: candle_core::Error,
    },

    /// The tokenizer file cannot be used.
    #[error("cannot load tokenizer {path}: {message}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// The tokenizers library's message.
        message: String,
    },

    /// Text could not be encoded or decoded.
    #[error("tokenizer failed on {input:?}: {message}")]
    Tokenize {
        /// The text (or a description of the ids).
        input: String,
        /// The tokenizers library's message.
        message: String,
    },

    /// An image could not be loaded or preprocessed.
    #[error(transparent)]
    Image(#[from] blip2_image::ImageError),

    /// The image processor settings are invalid.
    #[error(transparent)]
    ImageConfig(#[from] blip2_image::ConfigError),

    /// A request's settings are invalid (decoding options, prompt too long, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),

    /// A photo index is damaged, of another format, or made with another checkpoint.
    #[error("photo index {path}: {message}")]
    Index {
        /// The index directory or file.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },

    /// A file was given where a photo index directory is expected.
    #[error(
        "{path} is a file, not a photo index directory; an index is a directory that \
         `blip2 index FOLDER -o DIR` creates"
    )]
    IndexIsFile {
        /// The file.
        path: PathBuf,
    },

    /// The checkpoint could not be fetched from the Hugging Face hub.
    #[error("{0}")]
    Hub(String),

    /// A tensor operation failed while running the model. The message includes candle's,
    /// so it is not also exposed as the source (which would print it twice in a chain).
    #[error("model computation failed: {}", without_backtrace(.0))]
    Compute(candle_core::Error),

    /// Quantized language-model weights could not be made, written or read; the message
    /// names the file when there is one.
    #[error("{0}")]
    Quantized(String),
}

/// Returns the error without the backtrace candle attaches when `RUST_BACKTRACE` is set: a
/// message for users, not a crash report.
fn without_backtrace(error: &candle_core::Error) -> &candle_core::Error {
    match error {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(inner),
        other => other,
    }
}

impl From<candle_core::Error> for Error {
    fn from(error: candle_core::Error) -> Self {
        Self::Compute(error)
    }
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
