//! `blip2 ask`: answer one question about an image, printing the answer as it is generated.

use std::path::PathBuf;
use std::process::ExitCode;

use blip2_pipeline::Conversation;
use clap::Args;
use serde::Serialize;

use crate::args::{DecodingArgs, ImageArgs, LanguageModelArgs, ModelArgs, QuestionArgs};
use crate::output::{Pieces, out};

/// Arguments of `blip2 ask`.
#[derive(Debug, Args)]
pub struct AskArgs {
    /// The image file.
    pub image: PathBuf,

    /// The question, for example "What is the cat lying on?".
    pub question: String,

    /// Print one JSON object with the answer and its generated token ids instead of
    /// streaming the text.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub question_args: QuestionArgs,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub language: LanguageModelArgs,

    #[command(flatten)]
    pub decoding: DecodingArgs,

    #[command(flatten)]
    pub image_args: ImageArgs,
}

/// The `--json` output of `ask` and of each `chat` turn.
#[derive(Debug, Serialize)]
pub struct JsonAnswer<'a> {
    /// The question as asked.
    pub question: &'a str,
    /// The answer text.
    pub answer: &'a str,
    /// The generated token ids.
    pub token_ids: &'a [u32],
    /// Earlier turns left out of the prompt to fit the model.
    pub dropped_turns: usize,
}

/// Runs `blip2 ask`.
pub fn run(args: AskArgs) -> anyhow::Result<ExitCode> {
    let image = args.image_args.load(&args.image)?;
    let blip2 = args
        .model
        .load_with(&args.language, crate::args::DEFAULT_CAPTION_MODEL)?;
    let options = args.decoding.options(&blip2)?;
    let mut conversation = Conversation::new(&blip2, &image)?;
    conversation.set_template(args.question_args.template()?);
    if args.json {
        let answer = conversation.ask(&args.question, &options, None)?;
        let line = JsonAnswer {
            question: &args.question,
            answer: &answer.text,
            token_ids: &answer.token_ids,
            dropped_turns: answer.dropped_turns,
        };
        out!("{}", serde_json::to_string(&line)?)?;
    } else {
        let mut pieces = Pieces::default();
        conversation.ask(
            &args.question,
            &options,
            Some(&mut |piece| pieces.write(piece)),
        )?;
        pieces.finish()?;
        out!()?;
    }
    Ok(ExitCode::SUCCESS)
}
