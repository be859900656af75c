//! `blip2 chat`: a conversation about one image, one question per line of standard input.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use blip2_pipeline::Conversation;
use clap::Args;

use crate::args::{DecodingArgs, ImageArgs, LanguageModelArgs, ModelArgs, QuestionArgs};
use crate::ask::JsonAnswer;
use crate::output::{OutputError, Pieces, out};

/// Arguments of `blip2 chat`.
#[derive(Debug, Args)]
#[command(
    after_help = "Type a question and press Enter; earlier questions and answers are part of \
the prompt. /reset forgets them, /quit or end of input (Ctrl-D) leaves."
)]
pub struct ChatArgs {
    /// The image file; it is encoded once for the whole conversation.
    pub image: PathBuf,

    /// Print one JSON object per answer instead of streaming the text.
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

/// Runs `blip2 chat` until `/quit` or the end of standard input.
pub fn run(args: ChatArgs) -> anyhow::Result<ExitCode> {
    let image = args.image_args.load(&args.image)?;
    let blip2 = args
        .model
        .load_with(&args.language, crate::args::DEFAULT_CAPTION_MODEL)?;
    let options = args.decoding.options(&blip2)?;
    let template = args.question_args.template()?;
    // When not even the template around an empty question fits with --max-new-tokens, no
    // question can, so this is reported once rather than after every question.
    blip2.model().language_model()?;
    blip2
        .check_prompt_fits(&template.fill(""), &options)
        .context("no question fits the model with this --template and --max-new-tokens")?;
    let mut conversation = Conversation::new(&blip2, &image)?;
    conversation.set_template(template);

    let interactive = std::io::stdin().is_terminal();
    let prompt = || {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
    };
    prompt();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let question = line.trim();
        match question {
            "" => eprintln!("(empty question skipped; /quit or Ctrl-D leaves)"),
            "/quit" | "/exit" => break,
            "/reset" => {
                conversation.reset();
                eprintln!("(conversation reset; the image stays loaded)");
            }
            _ => ask_one(&mut conversation, question, &options, args.json)?,
        }
        prompt();
    }
    if interactive {
        eprintln!();
    }
    Ok(ExitCode::SUCCESS)
}

/// Generates the reply to one question and prints it. A model error is reported and the
/// conversation goes on. A failed write to standard output ends it.
fn ask_one(
    conversation: &mut Conversation<'_>,
    question: &str,
    options: &blip2_pipeline::GenerationOptions,
    json: bool,
) -> Result<(), OutputError> {
    let result = if json {
        let result = conversation.ask(question, options, None);
        if let Ok(answer) = &result {
            let line = JsonAnswer {
                question,
                answer: &answer.text,
                token_ids: &answer.token_ids,
                dropped_turns: answer.dropped_turns,
            };
            out!("{}", serde_json::to_string(&line).unwrap_or_default())?;
        }
        result
    } else {
        let mut pieces = Pieces::default();
        let result = conversation.ask(question, options, Some(&mut |piece| pieces.write(piece)));
        pieces.finish()?;
        if result.is_ok() {
            out!()?;
        }
        result
    };
    match result {
        Ok(answer) if answer.dropped_turns == 1 => {
            eprintln!("(the oldest turn was left out to fit the model's context)");
        }
        Ok(answer) if answer.dropped_turns > 1 => {
            eprintln!(
                "(the {} oldest turns were left out to fit the model's context)",
                answer.dropped_turns
            );
        }
        Ok(_) => {}
        Err(error) => eprintln!("error: {error}"),
    }
    Ok(())
}
