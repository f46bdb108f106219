"""gradtrace capture stage: records PyTorch training runs into run stores."""
