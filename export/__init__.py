"""On-device user encoder: ExecuTorch export (`build`), the artifact pair (`artifact`), device (`device`).

``fed_userllm.export.build.export_encoder`` writes ``encoder.pte`` + ``manifest.json`` from a training run;
``fed_userllm.export.device.embed`` turns an events CSV into user embeddings with the ExecuTorch runtime only.
Nothing is imported here, so the device path does not load the export toolchain.
"""
