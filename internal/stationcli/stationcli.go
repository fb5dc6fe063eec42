// Package stationcli is the command-line side of a station run, shared by
// `perso run` and the insider tool (cmd/insider), so that the attack tool
// drives readers, journal, manifest and display with exactly the code the
// honest station uses: reader selection from flags or environment, the
// progress display, the log, and the run itself.
package stationcli

import (
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"blindperso/batch"
	"blindperso/perso"
)

// Flags are the options every station command takes.
type Flags struct {
	Readers, ReaderNames     []string
	Regex, Progress, LogFile string
	Station                  string
	Count                    int
	APDUTimeout, CardTimeout time.Duration
}

// Register adds the flags to fl.
func (f *Flags) Register(fl *pflag.FlagSet) {
	fl.StringSliceVar(&f.Readers, "readers", nil, "readers by index or exact name, comma-separated (default: all)")
	fl.StringArrayVar(&f.ReaderNames, "reader", nil, "one reader by index or exact name (repeatable; names may hold commas)")
	fl.StringVar(&f.Regex, "reader-regex", "", "readers whose name matches this regular expression")
	fl.IntVar(&f.Count, "count", 0, "stop after this many cards are locked (0: until interrupted)")
	fl.StringVar(&f.Station, "station", "", "station name for the manifest (default: host name)")
	fl.StringVar(&f.Progress, "progress", "auto", "display: auto (live, on a terminal), on (live on a terminal, a line per change otherwise), off")
	fl.StringVar(&f.LogFile, "log", "", "append log lines to this file (default: standard error, unless the display is on)")
	fl.DurationVar(&f.APDUTimeout, "apdu-timeout", 5*time.Second, "longest wait for one card answer")
	fl.DurationVar(&f.CardTimeout, "card-timeout", 30*time.Second, "longest time for one card")
}

// Run is what differs between the commands.
type Run struct {
	Job   perso.Job
	Batch string
	// Fingerprint is the issuer key the journal and manifest name.
	Fingerprint [32]byte
	// Ledger turns the journal into the station's ledger; nil uses the
	// journal itself.
	Ledger func(*perso.Journal, *slog.Logger) (perso.Ledger, error)
	// What names the run in the log ("station"); Attrs are logged at start.
	What  string
	Attrs []any
}

// Selector is the reader selection: the flags, or without any, the
// environment (perso.EnvReaders, perso.EnvReaderRegex).
func (f *Flags) Selector() (perso.Selector, error) {
	items := append(append([]string(nil), f.Readers...), f.ReaderNames...)
	regex := f.Regex
	if len(items) == 0 && regex == "" {
		if v := os.Getenv(perso.EnvReaders); v != "" {
			items = strings.Split(v, ",")
		}
		regex = os.Getenv(perso.EnvReaderRegex)
	}
	return perso.ParseSelector(items, regex)
}

// Run checks every flag, then opens the batch's journal, writes the
// manifest, drives the PC/SC readers until Count cards are locked or
// cmd's context ends, and writes the manifest again. A refused start
// leaves no file behind.
func (f *Flags) Run(cmd *cobra.Command, r Run) error {
	sel, err := f.Selector()
	if err != nil {
		return err
	}
	if f.Count < 0 {
		return fmt.Errorf("--count must be 0 or more, got %d", f.Count)
	}
	station := f.Station
	if station == "" {
		if station, err = os.Hostname(); err != nil {
			return fmt.Errorf("station name: %w (give --station)", err)
		}
	}
	show := false
	switch f.Progress {
	case "auto":
		show = perso.IsTerminal(os.Stderr)
	case "on":
		show = true
	case "off":
	default:
		return fmt.Errorf("--progress must be auto, on or off, got %q", f.Progress)
	}
	var logw io.Writer = cmd.ErrOrStderr()
	if show {
		logw = io.Discard
	}
	if f.LogFile != "" {
		lf, err := os.OpenFile(f.LogFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			return fmt.Errorf("open log: %w", err)
		}
		defer lf.Close()
		logw = lf
	}
	log := slog.New(slog.NewTextHandler(logw, nil))

	j, err := perso.OpenJournal(r.Batch, r.Job.Profile.Name, r.Fingerprint[:], log)
	if err != nil {
		return err
	}
	defer j.Close()
	var ledger perso.Ledger = j
	if r.Ledger != nil {
		if ledger, err = r.Ledger(j, log); err != nil {
			return err
		}
	}
	if _, err := perso.WriteManifest(j, station); err != nil {
		return err
	}
	log.Info(r.What+" started", append([]any{"station", station, "profile", r.Job.Profile.Name,
		"issuer_fingerprint", hex.EncodeToString(r.Fingerprint[:]), "batch", r.Batch,
		"records", j.Len(), "readers", sel.String(), "count", f.Count}, r.Attrs...)...)

	stats := perso.NewStats()
	st := &perso.Station{Job: r.Job, Ledger: ledger, Log: log, Count: f.Count, Stats: stats,
		APDUTimeout: f.APDUTimeout, CardTimeout: f.CardTimeout}
	var prog *perso.Progress
	if show {
		prog = perso.StartProgress(os.Stderr, stats, f.Count)
	}
	runErr := st.Run(cmd.Context(), perso.PCSC{Select: sel, Log: log})
	if prog != nil {
		prog.Stop()
	}
	m, merr := perso.WriteManifest(j, station)
	if runErr != nil {
		log.Error(r.What+" stopped on error", "err", runErr)
		return runErr
	}
	if merr != nil {
		return merr
	}
	log.Info(r.What+" stopped", "cards_locked", st.Done(), "batch_records", m.Count,
		"batch_sha256", hex.EncodeToString(m.SHA256), "manifest", batch.ManifestPath(r.Batch))
	if show {
		fmt.Fprintf(cmd.ErrOrStderr(), "%d cards locked; batch %s: %d records, manifest %s\n",
			st.Done(), r.Batch, m.Count, batch.ManifestPath(r.Batch))
	}
	return nil
}
