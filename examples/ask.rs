//! Answer a question about a photo: `cargo run --release --example ask -- MODEL IMAGE QUESTION`.

use blip2::{Blip2, LoadOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, image, question] = args.as_slice() else {
        return Err("usage: ask MODEL IMAGE QUESTION".into());
    };
    let blip2 = Blip2::from_pretrained(model, &LoadOptions::default())?;
    let photo = blip2::image::load_image(image, &Default::default())?;
    // The question is wrapped as "Question: {question} Answer:".
    let answer = blip2.ask(&photo, question, &blip2.default_generation_options())?;
    println!("{}", answer.text);
    Ok(())
}
