"""The Flower app's ClientApp side: a process that imports it hides third-party import-time diagnostics (see
`fed_userllm.runtime.quiet_library_diagnostics`), since torch reads its log settings when first imported."""

from fed_userllm.runtime import quiet_library_diagnostics

quiet_library_diagnostics()
