"""Recording a finished model at a chosen level of detail: metrics, figures, model, manifest."""
