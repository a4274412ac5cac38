//! xfuser-pipelines: pipelines, one file per diffusers pipeline.
