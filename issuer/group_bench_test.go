package issuer

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"blindperso/hsm"
	"blindperso/protocol"
)

// BenchmarkGroupImport measures what a second token member must not
// cost, in one run on one SoftHSM2 token seen through two library
// instances (the plain library and a p11fault copy): b.N/3 records
// imported by one member alone, by the group of two healthy members, and
// by the group with one member gone (vanished before the import: taken
// out at its first call, re-probed meanwhile), three times in turn; then
// the failover pause of each
// fault kind, injected in the middle of an import: the longest token
// time of a record that landed after the fault (the record in flight on
// the failed member, redone on the other). On a 2-core machine one member
// already uses both cores, so the ratios can only show the cost. The
// two members are also measured without a deadline (hsm.NoDeadline),
// which saves the goroutine hand-off of every call.
func BenchmarkGroupImport(b *testing.B) {
	r := newGroupRig(b, true, 1, 2, hsm.DefaultDeadline, hsm.DefaultProbeEvery)
	f := r.faults[0]
	p := protocol.ECDHP256AES
	n := max(b.N/3, 500)
	ctx := context.Background()
	lone := &Issuer{Token: r.members[0].Token, Key: r.members[0].Key, KEK: r.members[0].KEK}
	// The same two members without a deadline (--member-deadline 0):
	// each call in its caller's goroutine.
	ng, err := hsm.NewGroup(ctx, r.members, hsm.GroupOptions{Deadline: hsm.NoDeadline, Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	defer ng.Close(ctx)
	noDeadline := &Issuer{Token: lone.Token, Key: lone.Key, KEK: lone.KEK, Group: ng}
	run := func(is *Issuer, prefix uint32, during func()) (time.Duration, []landing) {
		rs, _ := keyedRecords(b, is, p, prefix, n)
		path := batchFile(b, is, p, rs)
		st := openStore(b, b.TempDir())
		var mu sync.Mutex
		var ls []landing
		im := &Importer{Issuer: is, Store: st, Workers: 2, TokenTime: func(d time.Duration) {
			mu.Lock()
			ls = append(ls, landing{at: time.Now(), took: d})
			mu.Unlock()
		}}
		done := make(chan struct{})
		start := time.Now()
		var rep BatchReport
		var err error
		go func() { defer close(done); rep, err = im.ImportFile(ctx, path) }()
		if during != nil {
			during()
		}
		<-done
		d := time.Since(start)
		if err != nil || rep.Imported != n {
			b.Fatalf("import: %+v, %v", rep, err)
		}
		return d, ls
	}
	b.ResetTimer()
	// Interleaved, three times, so that the machine's drift hits all
	// three alike.
	var one, two, twoND, down time.Duration
	for rep := range uint32(3) {
		d, _ := run(lone, 10+rep, nil)
		one += d
		d, _ = run(r.is, 20+rep, nil)
		two += d
		d, _ = run(noDeadline, 50+rep, nil)
		twoND += d
		f.Vanish()
		d, _ = run(r.is, 30+rep, nil)
		down += d
		f.Clear()
		r.waitUp(b)
	}
	b.ReportMetric(one.Seconds()/two.Seconds(), "two/one")
	b.ReportMetric(one.Seconds()/twoND.Seconds(), "two-no-deadline/one")
	b.ReportMetric(one.Seconds()/down.Seconds(), "one-down/one")
	b.ReportMetric(float64(3*n)/one.Seconds(), "one-member/s")
	one /= 3
	// The failover pauses: the fault half way through (by time).
	half := one / 2
	pauses := []struct {
		name   string
		inject func()
	}{
		{"error", func() { f.Fail("C_DeriveKey", pkcs11.CKR_DEVICE_ERROR) }},
		{"vanish", func() { f.Vanish() }},
		{"hang", func() { f.Delay("*", 3*time.Second) }},
	}
	for i, pc := range pauses {
		var at time.Time
		_, ls := run(r.is, uint32(40+i), func() {
			time.Sleep(half)
			at = time.Now()
			pc.inject()
		})
		f.Clear()
		var pause time.Duration
		for _, l := range ls {
			if l.at.After(at) {
				pause = max(pause, l.took)
			}
		}
		b.ReportMetric(pause.Seconds()*1000, "pause-ms-"+pc.name)
		r.waitUp(b)
	}
	b.ReportMetric(float64(hsm.DefaultDeadline.Milliseconds()), "deadline-ms")
	b.ReportMetric(0, "ns/op")
}

type landing struct {
	at   time.Time
	took time.Duration
}
