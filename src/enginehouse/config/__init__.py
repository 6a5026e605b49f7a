"""Model configuration: Triton's config.pbtxt schema, auto-complete and validation."""
