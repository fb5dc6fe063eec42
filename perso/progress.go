package perso

import (
	"bytes"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// IsTerminal reports whether f is a terminal (the progress display is for
// people; pipes and files get log lines).
func IsTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// Progress redraws the station's state on a terminal every quarter
// second, in place (cursor up, clear to end), until Stop. On anything else
// (a pipe, a CI log) it writes the summary line whenever it changed, as
// plain text, so a display asked for with --progress on stays readable.
type Progress struct {
	w     *os.File
	tty   bool
	stats *Stats
	count int
	lines int
	last  string // plain mode: the last summary written, without its clock
	quit  chan struct{}
	done  sync.WaitGroup
}

// StartProgress starts drawing stats (count: the target, 0 for none) on w.
func StartProgress(w *os.File, stats *Stats, count int) *Progress {
	p := &Progress{w: w, tty: IsTerminal(w), stats: stats, count: count, quit: make(chan struct{})}
	p.done.Add(1)
	go func() {
		defer p.done.Done()
		t := time.NewTicker(250 * time.Millisecond)
		defer t.Stop()
		for {
			p.draw()
			select {
			case <-p.quit:
				p.draw()
				return
			case <-t.C:
			}
		}
	}()
	return p
}

func (p *Progress) draw() {
	var b bytes.Buffer
	if !p.tty {
		p.stats.Render(&b, p.count)
		line, _, _ := strings.Cut(b.String(), "\n")
		// The rate and the clock change on every tick; the counters
		// are what is worth a line.
		key := strings.Join(strings.Fields(line)[:7], " ")
		if key != p.last {
			p.last = key
			fmt.Fprintln(p.w, line)
		}
		return
	}
	if p.lines > 0 {
		fmt.Fprintf(&b, "\x1b[%dA\x1b[J", p.lines)
	}
	p.lines = p.stats.Render(&b, p.count)
	p.w.Write(b.Bytes())
}

// Stop draws the final state and stops.
func (p *Progress) Stop() {
	close(p.quit)
	p.done.Wait()
}
