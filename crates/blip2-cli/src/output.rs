//! Results written to standard output.
//!
//! `println!` panics when standard output cannot be written (a full disk), and a write
//! whose error is ignored loses results silently. Every result line goes through
//! [`out!`] instead, which turns a failed write into the command's error.

use std::io::Write;
use std::process::ExitCode;

/// The error of a failed write to standard output.
#[derive(Debug)]
pub struct OutputError(pub std::io::Error);

impl std::fmt::Display for OutputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot write to standard output: {}", self.0)
    }
}

impl std::error::Error for OutputError {}

/// Writes one line to standard output.
pub fn write_line(line: std::fmt::Arguments) -> Result<(), OutputError> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_fmt(line)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush())
        .map_err(OutputError)
}

/// Writes streamed pieces of text to standard output. The model's callback cannot return
/// an error, so the first failed write is kept and returned by [`Pieces::finish`].
#[derive(Default)]
pub struct Pieces {
    failure: Option<OutputError>,
}

impl Pieces {
    /// Writes `piece` unless an earlier write failed.
    pub fn write(&mut self, piece: &str) {
        if self.failure.is_some() {
            return;
        }
        let mut stdout = std::io::stdout().lock();
        if let Err(error) = stdout
            .write_all(piece.as_bytes())
            .and_then(|()| stdout.flush())
        {
            self.failure = Some(OutputError(error));
        }
    }

    /// Returns the first failed write, if any.
    pub fn finish(self) -> Result<(), OutputError> {
        self.failure.map_or(Ok(()), Err)
    }
}

/// Returns whether `error` is a write to a pipe whose reader has gone, as when the output
/// goes through `head`. The command then stops without a message, as other command-line
/// tools do.
pub fn is_closed_pipe(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<OutputError>()
        .is_some_and(|e| e.0.kind() == std::io::ErrorKind::BrokenPipe)
}

/// `println!` that returns an [`OutputError`] instead of panicking.
macro_rules! out {
    () => {
        $crate::output::write_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::output::write_line(format_args!($($arg)*))
    };
}
pub(crate) use out;

/// Returns "s" unless `count` is one, for "1 photo" and "2 photos".
pub fn plural(count: usize) -> &'static str {
    if count == 1 { "" } else { "s" }
}

/// Returns the exit status of a batch: on failures, after the line "`failures` of `total`
/// `items` could not be `done`" on standard error.
pub fn batch_status(failures: usize, total: usize, items: &str, done: &str) -> ExitCode {
    if failures == 0 {
        return ExitCode::SUCCESS;
    }
    eprintln!("{failures} of {total} {items} could not be {done}");
    ExitCode::FAILURE
}
