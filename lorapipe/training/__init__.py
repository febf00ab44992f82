"""What every backend's training shares: the adapter folder it ends with, where its checkpoints live and which one
resumes, the one training monitor (metrics files, progress lines, plots, the tracker), a full disk said clearly, and
preemption."""
