"""The data-site agent: ClientApp handlers, local trainer, data loading and validation."""
