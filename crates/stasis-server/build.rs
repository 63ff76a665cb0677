// `sqlx::migrate!` embeds the migrations at build time: rebuild when one changes or is added.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
