//! `kiln`: thin entry point; everything lives in the library.

fn main() {
    std::process::exit(kiln_cli::main());
}
