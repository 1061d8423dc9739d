// A plain JavaScript Hypercore 10 peer for the Rust interop tests. Loopback only.
//
//   node peer.js serve N          create a core with N entries, listen on 127.0.0.1, print
//                                 {"key":..,"port":..}, serve replication to each connection
//   node peer.js fetch KEY PORT N  connect to 127.0.0.1:PORT, download entries 0..N of KEY,
//                                 print {"length":..,"entries":[..]} and exit 0
const net = require('net')
const Hypercore = require('hypercore')
const RAM = require('random-access-memory')

const [mode, ...args] = process.argv.slice(2)
const entry = (i) => Buffer.from(`js entry ${i}`)

function fail (err) {
  console.error(err && err.stack ? err.stack : String(err))
  process.exit(1)
}

async function serve (n) {
  const core = new Hypercore(RAM)
  await core.ready()
  const batch = []
  for (let i = 0; i < n; i++) batch.push(entry(i))
  if (batch.length) await core.append(batch)
  const server = net.createServer((socket) => {
    socket.setNoDelay(true)
    const stream = core.replicate(false)
    socket.pipe(stream).pipe(socket)
    stream.on('error', () => socket.destroy())
    socket.on('error', () => stream.destroy())
  })
  server.listen(0, '127.0.0.1', () => {
    console.log(JSON.stringify({ key: core.key.toString('hex'), port: server.address().port }))
  })
  // The test ends this process by closing its stdin.
  process.stdin.on('end', () => process.exit(0))
  process.stdin.resume()
}

async function fetch (keyHex, port, n) {
  const core = new Hypercore(RAM, Buffer.from(keyHex, 'hex'))
  await core.ready()
  const socket = net.connect(port, '127.0.0.1')
  socket.setNoDelay(true)
  const stream = core.replicate(true)
  socket.pipe(stream).pipe(socket)
  stream.on('error', fail)
  const entries = []
  for (let i = 0; i < n; i++) entries.push((await core.get(i, { timeout: 20000 })).toString())
  // Done: closing our end is not an error.
  stream.removeListener('error', fail)
  stream.on('error', () => {})
  socket.destroy()
  // Exit only once stdout is flushed: a pipe would otherwise cut the output short.
  process.stdout.write(JSON.stringify({ length: core.length, entries }) + '\n', () => process.exit(0))
}

const timer = setTimeout(() => fail(new Error('peer.js timed out after 60 s')), 60000)
timer.unref()
if (mode === 'serve') serve(Number(args[0] || 0)).catch(fail)
else if (mode === 'fetch') fetch(args[0], Number(args[1]), Number(args[2] || 0)).catch(fail)
else fail(new Error('usage: node peer.js serve N | fetch KEY PORT N'))
