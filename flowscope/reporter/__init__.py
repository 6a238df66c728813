"""The reporter: figures of frames (``plots``), the self-contained HTML page (``fs.report``),
exports to TensorBoard and CSV, and notebook views."""
