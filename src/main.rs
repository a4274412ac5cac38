//! `xfuser`: generate images with a diffusion transformer, serially or on many ranks.

fn main() {
    xfuser::cli::main()
}
