//! `xfuser-dit`: the `xfuser` command line with DiT registered next to the stock models.

fn main() {
    // Not a formality: without a reference to the plugin crate the linker may drop its
    // registrations (see `xfuser_dit_plugin::link`).
    xfuser_dit_plugin::link();
    xfuser::cli::main()
}
