package perso

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"time"
)

// Stats is the live state of a run, for the progress display: counters,
// each reader's state and the last errors. Only public data goes in.
type Stats struct {
	mu      sync.Mutex
	start   time.Time
	locked  int // personalized + recovered
	skipped int
	errors  int
	warns   int // attestations that did not verify (CheckAttestation)
	readers map[string]*readerStat
	lastErr []string
}

type readerStat struct {
	state    string
	lastCard string
	cards    int
	errors   int
}

// NewStats starts the clock.
func NewStats() *Stats {
	return &Stats{start: time.Now(), readers: map[string]*readerStat{}}
}

func (s *Stats) reader(name string) *readerStat {
	r := s.readers[name]
	if r == nil {
		r = &readerStat{}
		s.readers[name] = r
	}
	return r
}

// SetReader records what a reader is doing.
func (s *Stats) SetReader(name, state string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reader(name).state = state
}

// Card records a card finished in reader.
func (s *Stats) Card(reader, id, outcome string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.reader(reader)
	r.lastCard = id + " " + outcome
	if outcome == "skipped" {
		s.skipped++
		return
	}
	r.cards++
	s.locked++
}

// Error records a card error in reader.
func (s *Stats) Error(reader string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.errors++
	s.reader(reader).errors++
	msg := fmt.Sprintf("%s %s: %v", time.Now().Format("15:04:05"), reader, err)
	s.lastErr = append(s.lastErr, msg)
	if len(s.lastErr) > 3 {
		s.lastErr = s.lastErr[1:]
	}
}

// Warning records a card locked with a warning in reader (an
// attestation that does not verify): shown with the errors, counted
// apart.
func (s *Stats) Warning(reader string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.warns++
	msg := fmt.Sprintf("%s %s: warning: %v", time.Now().Format("15:04:05"), reader, err)
	s.lastErr = append(s.lastErr, msg)
	if len(s.lastErr) > 3 {
		s.lastErr = s.lastErr[1:]
	}
}

// Render writes the display: a summary line, a line per reader, the last
// errors. count is the target (0: none).
func (s *Stats) Render(w io.Writer, count int) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	el := time.Since(s.start)
	rate := float64(s.locked) / el.Seconds()
	target := ""
	if count > 0 {
		target = fmt.Sprintf("/%d", count)
	}
	var b strings.Builder
	warns := ""
	if s.warns > 0 {
		warns = fmt.Sprintf("  %d warnings", s.warns)
	}
	fmt.Fprintf(&b, "perso  %d%s locked  %d skipped  %d errors%s  %.2f cards/s  %s\n",
		s.locked, target, s.skipped, s.errors, warns, rate, el.Truncate(time.Second))
	names := make([]string, 0, len(s.readers))
	for n := range s.readers {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		r := s.readers[n]
		fmt.Fprintf(&b, "  %-28.28s %-20.20s %5d cards %3d err  last %s\n", n, r.state, r.cards, r.errors, r.lastCard)
	}
	for _, e := range s.lastErr {
		fmt.Fprintf(&b, "  ! %.150s\n", e)
	}
	io.WriteString(w, b.String())
	return strings.Count(b.String(), "\n")
}
