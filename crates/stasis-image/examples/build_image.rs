//! Builds (or finds) the default image in the default cache and prints where it is.
fn main() {
    let spec = stasis_image::ImageSpec::default();
    let progress = |m: &str| eprintln!("image: {m}");
    match stasis_image::ensure(&stasis_image::default_cache_dir(), &spec, &progress) {
        Ok(image) => println!("{}", serde_json::to_string_pretty(&image).unwrap()),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
