//! `blip2 match` and `blip2 classify`: how well texts describe images.

use std::path::PathBuf;
use std::process::ExitCode;

use blip2_pipeline::MatchScore;
use clap::Args;
use serde::Serialize;

use crate::args::{DEFAULT_RETRIEVAL_MODEL, ImageArgs, ModelArgs};
use crate::output::{OutputError, batch_status, out};

/// Arguments of `blip2 match`.
#[derive(Debug, Args)]
#[command(
    after_help = "itm_probability: the matching head's probability that the text describes \
the image, 0 to 1 (above 0.5 means a match). itc_similarity: cosine similarity of the image and \
text embeddings, best over the image queries, -1 to 1; compare it between texts, not against a \
fixed threshold."
)]
pub struct MatchArgs {
    /// The image file.
    pub image: PathBuf,

    /// Texts to score against the image (an empty one is reported, and the others are
    /// still scored).
    #[arg(required = true)]
    pub texts: Vec<String>,

    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub image_args: ImageArgs,
}

/// Arguments of `blip2 classify`.
#[derive(Debug, Args)]
#[command(
    after_help = "Labels are sorted by itm_probability, the matching head's probability \
that the label describes the image (0 to 1; labels are scored independently, so they do not sum \
to 1). itc_similarity is the embedding cosine similarity, -1 to 1."
)]
pub struct ClassifyArgs {
    /// Image files.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,

    /// Comma-separated labels, for example "a cat,a dog,a weapon".
    #[arg(long, required = true)]
    pub labels: String,

    /// Text around each label; `{}` is replaced by the label (for example "a photo of {}").
    #[arg(long, default_value = "{}")]
    pub template: String,

    /// Print one JSON object per image (JSON Lines) instead of a table.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub image_args: ImageArgs,
}

#[derive(Debug, Serialize)]
struct JsonScore<'a> {
    text: &'a str,
    itm_probability: f32,
    itc_similarity: f32,
    itm_logits: [f32; 2],
}

fn json_scores(scores: &[MatchScore]) -> Vec<JsonScore<'_>> {
    scores
        .iter()
        .map(|s| JsonScore {
            text: &s.text,
            itm_probability: s.itm_probability,
            itc_similarity: s.itc_similarity,
            itm_logits: s.itm_logits,
        })
        .collect()
}

fn print_table(scores: &[MatchScore]) -> Result<(), OutputError> {
    out!("{:>8}  {:>8}  text", "ITM", "ITC")?;
    for score in scores {
        out!(
            "{:>8.4}  {:>8.4}  {}",
            score.itm_probability,
            score.itc_similarity,
            score.text
        )?;
    }
    Ok(())
}

/// Returns the error for TEXT argument `position` (from 1) when it is empty or only
/// whitespace, which the model would score like any other text.
fn empty_text_error(position: usize, text: &str) -> Option<String> {
    text.trim().is_empty().then(|| {
        format!("TEXT {position} ({text:?}) is empty; give words to score against the image")
    })
}

/// Runs `blip2 match`. Texts that are empty or too long for the Q-Former are reported and
/// the others scored, with exit status 1.
pub fn run_match(args: MatchArgs) -> anyhow::Result<ExitCode> {
    let mut errors: Vec<Option<String>> = (args.texts.iter().enumerate())
        .map(|(i, text)| empty_text_error(i + 1, text))
        .collect();
    // Read first, so that a bad image is reported even when no text is left to score.
    let image = args.image_args.load(&args.image)?;
    let mut scores = Vec::new();
    if errors.iter().any(Option::is_none) {
        let blip2 = args.model.load(DEFAULT_RETRIEVAL_MODEL)?;
        // Checked one by one, so that a text too long for the Q-Former is reported by its
        // position and the others are still scored. A checkpoint without matching heads
        // fails the first text and ends the run.
        for (i, (text, error)) in args.texts.iter().zip(&mut errors).enumerate() {
            if error.is_none()
                && let Err(failure) = blip2.tokenize_texts(&[text])
            {
                if matches!(failure, blip2_pipeline::Error::InvalidRequest(_)) {
                    *error = Some(format!("TEXT {}: {failure}", i + 1));
                } else {
                    return Err(failure.into());
                }
            }
        }
        let texts: Vec<&str> = (args.texts.iter().zip(&errors))
            .filter(|(_, error)| error.is_none())
            .map(|(text, _)| text.as_str())
            .collect();
        if !texts.is_empty() {
            scores = blip2.match_texts(&image, &texts)?;
        }
    }

    if args.json {
        // One entry per TEXT in order: its scores, or the error.
        let mut scored = json_scores(&scores).into_iter();
        let entries: Vec<serde_json::Value> = (args.texts.iter().zip(&errors))
            .map(|(text, error)| match error {
                Some(error) => serde_json::json!({ "text": text, "error": error }),
                None => serde_json::json!(scored.next()),
            })
            .collect();
        let line =
            serde_json::json!({ "image": args.image.display().to_string(), "scores": entries });
        out!("{line}")?;
    } else if !scores.is_empty() {
        print_table(&scores)?;
    }
    let failures = errors.iter().flatten().count();
    for error in errors.iter().flatten() {
        eprintln!("error: {error}");
    }
    Ok(batch_status(failures, args.texts.len(), "texts", "scored"))
}

/// Splits and checks the label list.
fn parse_labels(labels: &str) -> anyhow::Result<Vec<String>> {
    let labels: Vec<String> = labels.split(',').map(|l| l.trim().to_string()).collect();
    if labels.iter().all(String::is_empty) {
        anyhow::bail!("--labels is empty; give comma-separated labels such as \"a cat,a dog\"");
    }
    if let Some(position) = labels.iter().position(String::is_empty) {
        anyhow::bail!(
            "label {} of --labels is empty (two commas in a row, or a trailing comma?)",
            position + 1
        );
    }
    Ok(labels)
}

/// Runs `blip2 classify`; fails when any image could not be classified.
pub fn run_classify(args: ClassifyArgs) -> anyhow::Result<ExitCode> {
    let labels = parse_labels(&args.labels)?;
    // The label goes where a question template puts its question.
    let template = blip2_pipeline::QuestionTemplate::new(&args.template).map_err(|_| {
        anyhow::anyhow!(
            "the --template {:?} must contain exactly one {{}} where the label goes",
            args.template
        )
    })?;
    let texts: Vec<String> = labels.iter().map(|label| template.fill(label)).collect();
    let text_refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let blip2 = args.model.load(DEFAULT_RETRIEVAL_MODEL)?;
    // Checked once here: a checkpoint without matching heads, or a label longer than the
    // Q-Former reads, would fail every image alike.
    blip2.tokenize_texts(&text_refs)?;

    let mut failures = 0;
    for path in &args.images {
        // An image that cannot be read is reported and the others go on. An error of the
        // model would repeat for every image, so it ends the run.
        let mut scores = match args.image_args.load(path) {
            Ok(image) => blip2.match_texts(&image, &text_refs)?,
            Err(error) => {
                failures += 1;
                if args.json {
                    out!(
                        "{}",
                        serde_json::json!({ "image": path.display().to_string(), "error": crate::error_message(&error) })
                    )?;
                } else {
                    eprintln!("error: {}", crate::error_message(&error));
                }
                continue;
            }
        };
        for (score, label) in scores.iter_mut().zip(&labels) {
            score.text = label.clone();
        }
        scores.sort_by(|a, b| b.itm_probability.total_cmp(&a.itm_probability));
        if args.json {
            let line = serde_json::json!({ "image": path.display().to_string(), "labels": json_scores(&scores) });
            out!("{line}")?;
        } else {
            if args.images.len() > 1 {
                out!("{}:", path.display())?;
            }
            print_table(&scores)?;
        }
    }
    Ok(batch_status(
        failures,
        args.images.len(),
        "images",
        "classified",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_split_and_checked() {
        assert_eq!(
            parse_labels(" a cat, a dog ").unwrap(),
            vec!["a cat", "a dog"]
        );
        assert!(parse_labels("").unwrap_err().to_string().contains("empty"));
        assert!(
            parse_labels(" , ")
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        assert!(
            parse_labels("a,,b")
                .unwrap_err()
                .to_string()
                .contains("label 2")
        );
    }
}
