package main

import (
	"encoding/hex"
	"errors"
	"fmt"
	"os"

	"github.com/ebfe/scard"
	"github.com/spf13/cobra"

	"blindperso/batch"
	"blindperso/perso"
)

// sealCmd repairs a batch left by a crashed station (a torn last line) and
// writes its manifest, without touching a card: for handing a batch to the
// issuer when the station will not run again.
func sealCmd() *cobra.Command {
	var batchPath, station string
	c := &cobra.Command{
		Use:   "seal",
		Short: "Repair a batch after a crash and write its manifest",
		Long: `Repair a batch left by a crashed station (a torn last line is cut off and
kept beside it) and write its manifest, without touching a card. The
manifest is of the batch's own version: blindperso-batch/2, or
blindperso-batch/1 for a batch an older station wrote (docs/BATCH.md).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if _, err := os.Stat(batchPath); err != nil {
				return fmt.Errorf("batch: %w", err)
			}
			if station == "" {
				station, _ = os.Hostname()
			}
			j, err := perso.OpenJournal(batchPath, "", nil, nil)
			if err != nil {
				return err
			}
			defer j.Close()
			m, err := perso.WriteManifest(j, station)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s: %d records, sha256 %s\n", batch.ManifestPath(batchPath), m.Count, hex.EncodeToString(m.SHA256))
			return nil
		},
	}
	c.Flags().StringVar(&batchPath, "batch", "", "batch file (required)")
	c.Flags().StringVar(&station, "station", "", "station name for the manifest (default: host name)")
	c.MarkFlagRequired("batch")
	return c
}

// readersCmd lists the PC/SC readers with the indices --readers takes.
func readersCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "readers",
		Short: "List PC/SC readers and their indices",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			sc, err := scard.EstablishContext()
			if err != nil {
				return fmt.Errorf("PC/SC: establish context (is pcscd running?): %w", err)
			}
			defer sc.Release()
			names, err := sc.ListReaders()
			if errors.Is(err, scard.ErrNoReadersAvailable) {
				return errors.New("PC/SC: no readers")
			}
			if err != nil {
				return fmt.Errorf("PC/SC: list readers: %w", err)
			}
			for i, n := range names {
				fmt.Fprintf(cmd.OutOrStdout(), "%d\t%s\n", i, n)
			}
			return nil
		},
	}
}
