package perso_test

import (
	"context"
	"fmt"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"blindperso/card"
	"blindperso/perso"
	"blindperso/perso/persotest"
)

// cpuTime is this process's user + system CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkCardAlone is the baseline: the applet's own time for one card
// (SELECT, GET ID, GET STATUS, PERSONALIZE, LOCK through card.Client,
// in process, no station): wall time and CPU per card.
func BenchmarkCardAlone(b *testing.B) {
	job := testJob(b)
	paths := manufacture(b, b.TempDir(), 0xA0, b.N)
	cpu0 := cpuTime()
	b.ResetTimer()
	for i := range b.N {
		a := open(b, paths[i])
		c := &card.Client{T: a.Local()}
		c.Select()
		c.ID()
		c.Status()
		ct, err := c.Personalize(job.Profile, job.Key.SPKI)
		if err != nil {
			b.Fatal(err)
		}
		if err := c.Lock(ct); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64((cpuTime()-cpu0).Microseconds())/float64(b.N), "cpu-µs/card")
}

// BenchmarkStationLocal: b.N cards through the station with the
// in-process transport at 1, 2, 8 and 16 readers, journal on disk. It
// reports throughput (cards/s, and per reader) and process CPU per card;
// the station's own CPU is that minus BenchmarkCardAlone's.
func BenchmarkStationLocal(b *testing.B) {
	job := testJob(b)
	for _, n := range []int{1, 2, 8, 16} {
		b.Run(fmt.Sprintf("readers=%d", n), func(b *testing.B) {
			dir := b.TempDir()
			paths := manufacture(b, dir, 0xA1, b.N)
			h := make(persotest.Hopper, b.N)
			for _, p := range paths {
				h <- persotest.AppletCard(open(b, p))
			}
			close(h)
			j := openJournal(b, job, filepath.Join(dir, "batch.ndjson"), nil)
			defer j.Close()
			st := &perso.Station{Job: job, Ledger: j}
			cpu0, t0 := cpuTime(), time.Now()
			b.ResetTimer()
			if err := st.Run(context.Background(), persotest.LocalSlots{N: n, Hopper: h}); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			el := time.Since(t0)
			if st.Done() != b.N {
				b.Fatalf("%d of %d cards locked", st.Done(), b.N)
			}
			rate := float64(b.N) / el.Seconds()
			b.ReportMetric(rate, "cards/s")
			b.ReportMetric(rate/float64(n), "cards/s/reader")
			b.ReportMetric(float64((cpuTime()-cpu0).Microseconds())/float64(b.N), "cpu-µs/card")
		})
	}
}

// BenchmarkStationPCSC: cards through pcscd + vpcd (the feeder's 500 ms
// gap and pcscd's 400 ms poll included: a perso machine's mechanics) at 1
// and 2 readers — the two slots one pcscd's vpcd driver offers.
func BenchmarkStationPCSC(b *testing.B) {
	needPCSC(b)
	job := testJob(b)
	for _, n := range []int{1, 2} {
		b.Run(fmt.Sprintf("readers=%d", n), func(b *testing.B) {
			dir := b.TempDir()
			per := (b.N + n - 1) / n
			var slots [][]string
			var names []string
			for s := range n {
				slots = append(slots, manufacture(b, dir, byte(0xB0+s), per))
				names = append(names, daemon.ReaderName(s))
			}
			j := openJournal(b, job, filepath.Join(dir, "batch.ndjson"), nil)
			defer j.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			st := &perso.Station{Job: job, Ledger: j, Count: per * n}
			cpu0, t0 := cpuTime(), time.Now()
			b.ResetTimer()
			fed := feed(ctx, b, slots)
			if err := st.Run(ctx, perso.PCSC{Select: perso.Selector{Names: names}}); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			el := time.Since(t0)
			cancel()
			for range fed {
			}
			rate := float64(st.Done()) / el.Seconds()
			b.ReportMetric(rate, "cards/s")
			b.ReportMetric(rate/float64(n), "cards/s/reader")
			b.ReportMetric(float64((cpuTime()-cpu0).Microseconds())/float64(st.Done()), "cpu-µs/card")
		})
	}
}
