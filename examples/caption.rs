//! Caption one photo: `cargo run --release --example caption -- MODEL IMAGE [PROMPT]`.
//!
//! MODEL is a checkpoint directory or a hub id such as Salesforce/blip2-opt-2.7b.

use blip2::{Blip2, LoadOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, image, rest @ ..] = args.as_slice() else {
        return Err("usage: caption MODEL IMAGE [PROMPT]".into());
    };
    let blip2 = Blip2::from_pretrained(model, &LoadOptions::default())?;
    let photo = blip2::image::load_image(image, &Default::default())?;
    let prompt = rest.first().map(String::as_str);
    let caption = blip2.caption(&photo, prompt, &blip2.default_generation_options())?;
    println!("{}", caption.text);
    Ok(())
}
