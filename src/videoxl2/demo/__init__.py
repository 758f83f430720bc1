"""The bundled demo model at work: `videoxl2 demo` (one synthetic video, a few questions, bi-level) and
`videoxl2 niah` (needle-in-a-haystack accuracy over length x depth, per engine mode)."""
