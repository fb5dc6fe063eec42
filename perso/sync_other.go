//go:build !linux

package perso

import "os"

func fdatasync(f *os.File) error { return f.Sync() }
