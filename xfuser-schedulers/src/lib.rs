//! xfuser-schedulers: noise schedulers, one file per diffusers scheduler file, each
//! registering itself in the xfuser-core registry.
