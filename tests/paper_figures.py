"""The paper's per-task figures (../shared/paper-figures.md): GPT-2 Large's seconds per neighbor
on an A100 (training plus one scoring pass), and the Pile test set's documents per task (the
reference's lm_eval pile dataset_infos.json), keyed by the Pile's set names."""

from __future__ import annotations

# task: (seconds per neighbor, GPT-2 Large, A100; test documents in the Pile's test set)
GPT2_LARGE = {
    "ArXiv": (13.52, 2407),
    "BookCorpus2": (69.33, 28),
    "Books3": (100.87, 269),
    "DM Mathematics": (3.02, 1922),
    "Enron Emails": (0.44, 1010),
    "EuroParl": (23.57, 157),
    "FreeLaw": (3.29, 5101),
    "Github": (1.90, 18195),
    "Gutenberg (PG-19)": (84.74, 80),
    "HackerNews": (1.22, 1632),
    "NIH ExPorter": (0.39, 1884),
    "OpenSubtitles": (6.39, 642),
    "OpenWebText2": (0.90, 32925),
    "PhilPapers": (13.84, 68),
    "Pile-CC": (0.93, 52790),
    "PubMed Abstracts": (0.34, 29895),
    "PubMed Central": (7.23, 5911),
    "StackExchange": (0.63, 30378),
    "Ubuntu IRC": (93.55, 22),
    "USPTO Backgrounds": (0.78, 11415),
    "Wikipedia (en)": (0.59, 17511),
    "YoutubeSubtitles": (6.28, 342),
}
