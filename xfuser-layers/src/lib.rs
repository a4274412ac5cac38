//! xfuser-layers: parallel building blocks (attention processors, patch-aware embeddings,
//! tensor-parallel linear layers). The serial forms live in the model files for now; parallel
//! processors arrive with the distributed runtime.
