package perso

import (
	"os"
	"syscall"
)

// fdatasync makes the file's data durable without waiting for a metadata
// update the data does not need (an append changes the size, which
// fdatasync does write).
func fdatasync(f *os.File) error { return syscall.Fdatasync(int(f.Fd())) }
