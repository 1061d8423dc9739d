// Appends to JS multifeed 6 on disk (random-access-file) or in memory, for the comparison run.
// usage: node appends.js single|batch disk|memory   (prints one JSON line)
// Needs the JS baseline's packages: run from anywhere with NODE_PATH pointing at
// ../shared/baselines/js-multifeed/node_modules (the compare tool does this).
const multifeed = require('multifeed')
const ram = require('random-access-memory')
const os = require('os'); const fs = require('fs'); const path = require('path')
const [mode = 'single', where = 'disk'] = process.argv.slice(2)
const N = 10000
const entry = (n) => ({ msg: 'x'.repeat(80), n })
const store = where === 'disk' ? fs.mkdtempSync(path.join(os.tmpdir(), 'mf-appends-')) : ram
const m = multifeed(store, { valueEncoding: 'json' })
m.ready(() => m.writer('w', (err, w) => {
  if (err) throw err
  const t0 = process.hrtime.bigint()
  const done = (err) => {
    if (err) throw err
    const ms = Number(process.hrtime.bigint() - t0) / 1e6
    console.log(JSON.stringify({ mode, storage: where, ms, entries: w.length, rss_mb: Math.round(process.memoryUsage().rss / 1e6) }))
  }
  if (mode === 'batch') {
    const batch = []
    for (let i = 0; i < N; i++) batch.push(entry(i))
    w.append(batch, done)
  } else {
    let i = 0
    ;(function next (err) {
      if (err) throw err
      if (i >= N) return done()
      w.append(entry(i++), next)
    })()
  }
}))
