"""Recording: the hook primitive, the snapshot of a tensor (a C kernel on the CPU, batched
torch ops elsewhere), the recorder behind ``fs.watch``, and the frames and files it makes."""
