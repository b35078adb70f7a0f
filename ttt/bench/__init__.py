"""The `ttt bench` family: embed, index, retrieval and ttt benchmarks, one module each."""
