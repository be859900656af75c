//! A conversation about one photo, reading questions from standard input and
//! streaming the answers: `cargo run --release --example chat -- MODEL IMAGE`.

use std::io::{BufRead, Write};

use blip2::pipeline::Conversation;
use blip2::{Blip2, LoadOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, image] = args.as_slice() else {
        return Err("usage: chat MODEL IMAGE".into());
    };
    let blip2 = Blip2::from_pretrained(model, &LoadOptions::default())?;
    let photo = blip2::image::load_image(image, &Default::default())?;
    let options = blip2.default_generation_options();
    // The image is encoded here, once; each question reuses it.
    let mut conversation = Conversation::new(&blip2, &photo)?;
    for line in std::io::stdin().lock().lines() {
        let mut print = |piece: &str| {
            print!("{piece}");
            let _ = std::io::stdout().flush();
        };
        match conversation.ask(&line?, &options, Some(&mut print)) {
            Ok(_) => println!(),
            Err(error) => eprintln!("error: {error}"),
        }
    }
    Ok(())
}
