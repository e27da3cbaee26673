"""Process plumbing below everything else: the process group and how a process ends."""
