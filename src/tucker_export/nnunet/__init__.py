"""The nnU-Net glue: loading trained model folders and (later) the engine-backed predictor."""
