"""What a finished model is worth: likelihood bounds, latent usage, classifier-judged samples."""
